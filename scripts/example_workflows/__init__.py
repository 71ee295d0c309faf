"""The example workflows' generator: the catalogue (``catalogue``: graphs, titles; ``files``: the
model files and URLs), the UI conversion (``ui_format``), the view (``layout``) and the writer of
example_workflows/ and the README table (``writer``). ``python scripts/example_workflows <ComfyUI>``
regenerates everything (``__main__``)."""

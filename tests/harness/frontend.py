"""Headless Chromium (Debian's ``chromium`` package) driven by Playwright against the real
ComfyUI frontend served by a test server.

Playwright's own browser download is not used: ``executable_path`` points at the system
Chromium, started with a fresh profile and without any background networking.
"""
import os
import shutil
import tempfile

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "test-artifacts")


def chromium_path():
    env = os.environ.get("XCTRL_CHROMIUM")
    for path in ((env,) if env else ()) + CHROMIUM_CANDIDATES:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def unavailable_reason():
    """None when a browser test can run, else the one-line reason."""
    if not chromium_path():
        return ("NO CHROMIUM: frontend tests skipped (apt-get install -y chromium chromium-driver, "
                "pip install playwright; or set XCTRL_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "NO PLAYWRIGHT: frontend tests skipped (pip install playwright; its browser download is not needed)"
    return None


class Browser:
    """One persistent-profile Chromium context with one page; close() removes the profile."""

    def __init__(self, width=1600, height=1000):
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self._profile = tempfile.mkdtemp(prefix="xctrl_chromium_")
        self.context = self._pw.chromium.launch_persistent_context(
            self._profile, executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height})
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.console_errors = []
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)

    def open_comfyui(self, url, timeout_ms=180000):
        ready = "() => window.app && window.app.graph && window.LiteGraph"
        self.page.goto(url, timeout=timeout_ms)
        self.page.wait_for_function(ready, timeout=timeout_ms)
        # A returning user: no first-run templates browser over the canvas.
        self.page.evaluate("async () => fetch('/api/settings/Comfy.TutorialCompleted', {method: 'POST', body: 'true'})")
        self.page.reload(timeout=timeout_ms)
        self.page.wait_for_function(ready, timeout=timeout_ms)
        self.page.keyboard.press("Escape")

    def screenshot(self, *parts):
        path = os.path.join(ARTIFACTS, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.page.screenshot(path=path)
        return path

    def close(self):
        try:
            self.context.close()
        finally:
            self._pw.stop()
            shutil.rmtree(self._profile, ignore_errors=True)


# JavaScript run in the page -----------------------------------------------------------------
# Closes what a load may have opened: dialogs, the error overlay and the side panel showing it.
CLOSE_DIALOG_JS = """
async () => {
  for (const d of document.querySelectorAll('.p-dialog')) {
    const close = d.querySelector('.p-dialog-close-button, button[aria-label="Close"]');
    if (close) close.click();
  }
  const dismiss = document.querySelector('[data-testid="error-overlay-dismiss"]');
  if (dismiss) dismiss.click();
  const panel = document.querySelector('[data-testid="properties-panel"]');
  const toggle = panel && panel.querySelector('button[aria-label="Toggle properties panel"]');
  if (toggle) toggle.click();
  await new Promise(res => setTimeout(res, 300));
}
"""

# The missing-models list a load brings up, whichever form the frontend gives it: a dialog
# (.comfy-missing-models: each row's URL in a title, a download button titled with it) in older
# frontends; in newer ones an error overlay whose details (the side panel's errors tab) list each
# file, its folder and a Download button that opens the file's URL (read here by catching that
# navigation). Waits up to waitMs for either; rows [{label: 'folder / file', url, downloadable}],
# or null when none came.
MISSING_MODELS_JS = """
async ([waitMs]) => {
  const sleep = ms => new Promise(res => setTimeout(res, ms));
  const dialogRows = dialog => [...dialog.querySelectorAll('span[title]')].map(span => {
    const url = span.title;
    const button = [...dialog.querySelectorAll('button[title]')].find(b => b.title === url);
    return {label: span.textContent.trim(), url, downloadable: !!button && !button.disabled};
  });
  const urlOpenedBy = async button => {
    const opened = [], click = HTMLAnchorElement.prototype.click, open = window.open;
    HTMLAnchorElement.prototype.click = function () { opened.push(this.getAttribute('href')); };
    window.open = url => { opened.push(String(url)); return null; };
    try {
      button.click();
      for (let i = 0; i < 50 && !opened.length; i++) await sleep(100);
    } finally {
      HTMLAnchorElement.prototype.click = click;
      window.open = open;
    }
    return opened.length ? opened[0] : null;
  };
  const panelRows = async group => {
    const rows = [];
    for (const name of group.querySelectorAll('[title]:not([aria-label])')) {
      const folder = (name.parentElement.nextElementSibling?.textContent || '').split(' · ')[0].trim();
      const button = name.parentElement.parentElement.parentElement.querySelector('[data-testid="missing-model-download"]');
      const url = button && !button.disabled ? await urlOpenedBy(button) : null;
      rows.push({label: `${folder} / ${name.title}`, url, downloadable: !!button && !button.disabled && !!url});
    }
    return rows;
  };
  const groupSel = '[data-testid="error-group-missing-model"]';
  const deadline = Date.now() + waitMs;
  let opened = false;
  while (Date.now() < deadline) {
    const dialog = document.querySelector('.comfy-missing-models');
    const group = document.querySelector(groupSel);
    if (dialog || (group && group.querySelector('[title]:not([aria-label])'))) {
      await sleep(300);  // the rows render with their list
      return dialog ? dialogRows(dialog) : await panelRows(document.querySelector(groupSel));
    }
    const details = document.querySelector('[data-testid="error-overlay-see-errors"]');
    if (details && !opened) { details.click(); opened = true; }
    await sleep(100);
  }
  return null;
}
"""

# The live canvas after a load: every node's screen rectangle (title bar included), the rectangle
# of the canvas that the top bar and side toolbar leave (null when the frontend's layout has
# neither), the minimap's rectangle (null when hidden), the zoom and whether the frontend draws
# the nodes in low quality (bare boxes: below its minimum font size for detail).
GEOMETRY_JS = """
() => {
  const canvas = window.app.canvas;
  canvas.draw(true, true);
  const th = LiteGraph.NODE_TITLE_HEIGHT;
  const box = canvas.canvas.getBoundingClientRect();
  const nodes = window.app.graph._nodes.map(n => {
    const [x, y] = canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - th]);
    const s = canvas.ds.scale;
    return {title: n.title, rect: [box.x + x, box.y + y, n.size[0] * s, (n.size[1] + th) * s]};
  });
  const rect = e => { const r = e.getBoundingClientRect(); return r.width && r.height ? [r.x, r.y, r.width, r.height] : null; };
  const bottom = sel => Math.max(0, ...[...document.querySelectorAll(sel)].map(e => e.getBoundingClientRect().bottom));
  const bar = document.querySelector('.side-tool-bar-container');
  const top = Math.max(bottom('.workflow-tabs-container'), bottom('.subgraph-breadcrumb'), bottom('.actionbar-container'));
  const left = bar ? bar.getBoundingClientRect().right : 0;
  const visible = bar && top > 0 ? [left, top, window.innerWidth - left, window.innerHeight - top] : null;
  const minimap = document.querySelector('.litegraph-minimap, .minimap-main-container');
  return {nodes, visible, minimap: minimap && rect(minimap), scale: canvas.ds.scale, low_quality: canvas.low_quality,
          low_quality_below: canvas._lowQualityZoomThreshold};
}
"""

# Opens a template as the templates menu does (the frontend fits the view in newer releases),
# then reports the live canvas (GEOMETRY_JS).
OPEN_TEMPLATE_JS = ("""
async ([pack, name]) => {
  const r = await fetch(`/api/workflow_templates/${pack}/${name}.json`);
  if (!r.ok) return {error: `template fetch ${r.status}`};
  const wf = await r.json();
  await window.app.loadGraphData(wf, true, true, name, {openSource: 'template'});
  await new Promise(res => requestAnimationFrame(() => requestAnimationFrame(res)));
  await (""" + CLOSE_DIALOG_JS + """)();
  return (""" + GEOMETRY_JS + """)();
}
""")

# Loads a template (file name in the URL as is), then reports: node types the frontend lacks, widget values not in their lists, the rows of the missing-models
# list (MISSING_MODELS_JS, waiting up to waitMs; closed again unless keepDialog), every node's
# screen rectangle (title bar included) and the rectangle of the canvas that the top bar and side
# toolbar leave (null when the frontend's layout has neither).
LOAD_WORKFLOW_JS = ("""
async ([pack, name, keepDialog, waitMs]) => {
  const r = await fetch(`/api/workflow_templates/${pack}/${name}.json`);
  if (!r.ok) return {error: `template fetch ${r.status}`};
  const wf = await r.json();
  const types = [...new Set(wf.nodes.map(n => n.type))];
  const missing = types.filter(t => !(t in LiteGraph.registered_node_types));
  await window.app.loadGraphData(wf);
  const missing_models = await (""" + MISSING_MODELS_JS + """)([waitMs]);
  if (!keepDialog) await (""" + CLOSE_DIALOG_JS + """)();
  const {nodes, visible} = (""" + GEOMETRY_JS + """)();
  const invalid = [];
  for (const node of window.app.graph._nodes) {
    for (const w of node.widgets || []) {
      let values = w.options && w.options.values;
      if (typeof values === 'function') values = values();
      if (Array.isArray(values) && !values.includes(w.value)) invalid.push(`${node.type}.${w.name}=${w.value}`);
      if (typeof w.value === 'number' && !Number.isFinite(w.value)) invalid.push(`${node.type}.${w.name}=${w.value}`);
    }
  }
  return {missing, invalid, count: window.app.graph._nodes.length, expected: wf.nodes.length, missing_models, nodes,
          visible, workflow_nodes: wf.nodes.map(n => ({type: n.type, widgets_values: n.widgets_values}))};
}
""")

SET_WIDGETS_JS = """
(overrides) => {
  let n = 0;
  for (const node of window.app.graph._nodes)
    for (const w of node.widgets || [])
      if (w.name in overrides && typeof w.value === typeof overrides[w.name]) { w.value = overrides[w.name]; n++; }
  window.app.graph.setDirtyCanvas(true, true);
  return n;
}
"""

QUEUE_JS = "async () => { await window.app.queuePrompt(0, 1); return true; }"

"""What the tests add to the example-workflow generator (scripts/example_workflows): the API
prompt a workflow queues with the tests' lowered sizes, and the input files the workflows read."""
import os

from example_workflows.catalogue import IMAGE, POSE_VIDEO, TRAINING_FOLDER, WORKFLOWS
from example_workflows.ui_format import _is_link, to_api, to_ui

# The widget values the end-to-end tests lower to run on a CPU in bounded time (by input name).
TEST_OVERRIDES = {
    "width": 64, "height": 64, "steps": 1, "video_frames": 3, "length": 3, "batch_size": 1,
    "frames_per_window": 2, "overlap": 1,  # 3 frames in 2 windows: the long-video path runs
}



def api_prompt(name, object_info, overrides=None):
    """The API twin of one workflow (what the frontend queues), with ``overrides`` by input name."""
    prompt = to_api(to_ui(WORKFLOWS[name](), object_info), object_info)
    for node in prompt.values():
        for k in list(node["inputs"]):
            if overrides and k in overrides and not _is_link(node["inputs"][k]):
                node["inputs"][k] = overrides[k]
    return prompt


# ----------------------------------------------------------------------------- files
def write_test_inputs(folder, comfy_root):
    """example.png (ComfyUI's own example photo, 64 x 64 here), a 6-frame pose_video.mp4 and a
    two-image captioned training folder."""
    import av
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    src = os.path.join(comfy_root, "input", "example.png")
    img = Image.open(src).convert("RGB") if os.path.isfile(src) else Image.new("RGB", (64, 64), (120, 90, 60))
    img.resize((64, 64)).save(os.path.join(folder, IMAGE))
    training = os.path.join(folder, TRAINING_FOLDER)
    os.makedirs(training, exist_ok=True)
    for i, angle in enumerate((0, 90)):
        img.resize((64, 64)).rotate(angle).save(os.path.join(training, f"item_{i}.png"))
        with open(os.path.join(training, f"item_{i}.txt"), "w") as f:
            f.write(f"a test picture, turned {angle} degrees")
    rng = np.random.default_rng(0)
    with av.open(os.path.join(folder, POSE_VIDEO), "w") as c:
        st = c.add_stream("mpeg4", rate=6)
        st.width, st.height, st.pix_fmt = 64, 64, "yuv420p"
        for _ in range(6):
            frame = av.VideoFrame.from_ndarray((rng.random((64, 64, 3)) * 255).astype(np.uint8), format="rgb24")
            for packet in st.encode(frame):
                c.mux(packet)
        for packet in st.encode():
            c.mux(packet)



"""The preprocessor weight files: where they come from, and downloading one safely.

Pure Python (urllib, hashlib); the ComfyUI glue (runtime/annotator_models.py) chooses the folder
(ComfyUI/models/annotators) and passes a progress callback.

Integrity: the download goes to a temporary `<name>.<random>.partial` file in the target
folder; it is checked (byte count equal to the server's Content-Length and to the known size,
SHA-256 when known, not an HTML page) and only then renamed to its final name. On any failure
the partial file is deleted and an `AnnotatorDownloadError` says what happened, where to put
the file and where to get it. A file already present is never downloaded again.

Sizes and hashes (looked up in public sources, see KNOWN_FILES): body_pose_model.pth and
dw-ll_ucoco_384.onnx have an exact size and SHA-256; ControlNetHED.pth and yolox_l.onnx an exact
size; depth_anything_v2_vits.pth a lower bound only (24.8M fp32 parameters, about 99 MB).
"""
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass

CHUNK = 1 << 20


@dataclass(frozen=True)
class AnnotatorFile:
    name: str
    url: str
    size: int = None  # exact byte count, when known
    sha256: str = None  # when known
    min_size: int = 0  # sanity bound when the exact size is unknown
    approx: str = ""  # for messages and the README
    licence: str = ""
    used_by: str = ""  # the node id that reads it (its validation names every missing file at once)


HF = "https://huggingface.co/"

KNOWN_FILES = {f.name: f for f in (
    AnnotatorFile("ControlNetHED.pth", HF + "lllyasviel/Annotators/resolve/main/ControlNetHED.pth", size=29_444_406,
                  approx="29.4 MB", licence="Apache-2.0", used_by="XCtrl_HED"),
    AnnotatorFile("body_pose_model.pth", HF + "lllyasviel/Annotators/resolve/main/body_pose_model.pth", size=209_267_595,
                  sha256="25a948c16078b0f08e236bda51a385d855ef4c153598947c28c0d47ed94bb746",
                  approx="209 MB", licence="CMU OpenPose, non-commercial", used_by="XCtrl_OpenPose"),
    AnnotatorFile("depth_anything_v2_vits.pth",
                  HF + "depth-anything/Depth-Anything-V2-Small/resolve/main/depth_anything_v2_vits.pth",
                  min_size=95_000_000, approx="99.2 MB", licence="Apache-2.0", used_by="XCtrl_DepthAnythingV2"),
    AnnotatorFile("yolox_l.onnx", HF + "yzd-v/DWPose/resolve/main/yolox_l.onnx", size=216_746_733,
                  approx="217 MB", licence="Apache-2.0", used_by="XCtrl_DWPose"),
    AnnotatorFile("dw-ll_ucoco_384.onnx", HF + "yzd-v/DWPose/resolve/main/dw-ll_ucoco_384.onnx", size=134_399_116,
                  sha256="724f4ff2439ed61afb86fb8a1951ec39c6220682803b4a8bd4f598cd913b1843",
                  approx="134 MB", licence="Apache-2.0", used_by="XCtrl_DWPose"),
)}


class AnnotatorDownloadError(RuntimeError):
    """A weight file is missing and could not be downloaded (message says what to do)."""


def where_to_get(entry, folder):
    return (
        f"Download {entry.name} ({entry.approx or 'size unknown'}) from {entry.url} and put it in {folder} "
        "(any folder listed for 'annotators' in extra_model_paths.yaml works too), then run the workflow again."
    )


def download(entry, folder, progress=None, timeout=30, url=None):
    """Downloads `entry` into `folder` and returns the final path (see module docstring).

    `progress(done_bytes, total_bytes_or_None)` is called as data arrives. Raises
    AnnotatorDownloadError (nothing is left behind) when the server cannot be reached, the
    transfer is cut short, or the content fails the size / hash check."""
    url = url or entry.url
    final = os.path.join(folder, entry.name)
    if os.path.isfile(final):
        return final
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise AnnotatorDownloadError(f"{entry.name} is missing and the folder {folder} cannot be created ({e}). {where_to_get(entry, folder)}") from e
    fd, partial = tempfile.mkstemp(prefix=entry.name + ".", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            done, total, digest = _fetch(url, out, entry, progress, timeout, folder)
        problem = _check(entry, done, total, digest, partial)
        if problem:
            raise AnnotatorDownloadError(f"{entry.name}: the download from {url} {problem}; it was discarded. {where_to_get(entry, folder)}")
        if os.path.isfile(final):  # someone else finished first
            os.remove(partial)
        else:
            os.replace(partial, final)
        return final
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def _fetch(url, out, entry, progress, timeout, folder):
    request = urllib.request.Request(url, headers={"User-Agent": "xctrl-nodes", "Accept-Encoding": "identity"})
    digest = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if progress:
                progress(0, total or entry.size)
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                out.write(block)
                digest.update(block)
                done += len(block)
                if progress:
                    progress(done, total or entry.size)
    except urllib.error.HTTPError as e:
        raise AnnotatorDownloadError(f"{entry.name} is missing and the download from {url} failed (HTTP {e.code} {e.reason}). {where_to_get(entry, folder)}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise AnnotatorDownloadError(
            f"{entry.name} is missing and could not be downloaded from {url} ({type(e).__name__}: {reason}): "
            f"offline or the download was interrupted after {done} bytes. {where_to_get(entry, folder)}"
        ) from e
    return done, total, digest.hexdigest()


def _check(entry, done, total, digest, path):
    if total is not None and done != total:
        return f"stopped after {done} of {total} bytes (truncated)"
    if entry.size is not None and done != entry.size:
        return f"has {done} bytes, expected {entry.size}"
    if done < entry.min_size:
        return f"has only {done} bytes, expected about {entry.approx}"
    if entry.sha256 is not None and digest != entry.sha256:
        return f"has SHA-256 {digest}, expected {entry.sha256} (corrupt or a different file)"
    with open(path, "rb") as f:
        head = f.read(64).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"version https://git-lfs")):
        return "is a web page or an LFS pointer, not the weight file"
    return None

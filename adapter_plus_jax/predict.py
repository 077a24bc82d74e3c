"""Classify images with exported tasks: the top-k classes and their probabilities.

    apj predict --task tasks/dtd photo.jpg more_photos/
    apj predict --task tasks/dtd --task tasks/flowers --json photos/

Every image is classified by every task given; with several tasks, the (image, task) pairs
run as mixed batches through one backbone (`serving.TaskSet`). Folders are searched
recursively for JPEG, PNG, BMP, GIF and WebP files. The backbone is built as each task
records it (a ported directory or timm name; timm's random init for the demo) or taken from
--backbone, and must hash to the weights the tasks were trained on.

Output: one line per image and task (`FILE  TASK  class (probability), ...`), or with --json
one JSON object per line ({"file", "task", "predictions": [{"class", "index",
"probability"}]}, or {"file", "error"}). A missing or unreadable file is reported and the
others are still classified (exit status 1); bad tasks or a backbone that does not match stop
before any image is read (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.images import EXTENSIONS, find_images, preprocess_file, shown
from adapter_plus_jax.serving import TaskSet
from adapter_plus_jax.task import Task, load_backbone, read_task


def _task_names(paths: Sequence[str]) -> list[str]:
    """Each task's directory name, or the path as given where two names would be the same."""
    short = [Path(p.rstrip("/")).name for p in paths]
    return [s if short.count(s) == 1 else p for s, p in zip(short, paths, strict=True)]


def load_tasks(
    paths: Sequence[str], backbone: str | None = None, weights_dir: str | None = None,
    dtype: str = "float32", batch_size: int = 32,
) -> TaskSet:  # fmt: skip
    """The tasks in `paths` on their (one) backbone, checked against its hash."""
    tasks = [read_task(p, name) for p, name in zip(paths, _task_names(paths), strict=True)]
    sharing = [t for t in tasks if t.needs_backbone]
    digests = {t.backbone.sha256: t for t in sharing}
    if len(digests) > 1:
        listed = ", ".join(f"{t.name}: {t.backbone.name} ({d[:12]})" for d, t in digests.items())
        raise SetupError(f"The tasks were trained on different backbones ({listed}); "
                         "predict with one backbone's tasks at a time.")  # fmt: skip
    weights = None
    if sharing:
        what = sharing[0].name if len(tasks) == 1 else f"the tasks ({sharing[0].name}, ...)"
        weights = load_backbone(sharing[0].backbone, backbone, weights_dir, what)
    return TaskSet(tasks, weights, dtype=dtype, batch_size=batch_size)


def collect(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]], bool]:
    """(image files, (input, error) for missing ones, whether a folder was given)."""
    files, errors, folders = [], [], False
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            folders = True
            found = find_images(path)
            if not found:
                errors.append((item, f"no image files ({', '.join(EXTENSIONS)}) in this folder"))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            errors.append((item, "no such file or folder"))
    return files, errors, folders


def _prepared(path: Path, tasks: Sequence[Task]) -> list[np.ndarray]:
    """The image as each task's input (tasks with the same preprocessing share one)."""
    done, out = {}, []
    for task in tasks:
        key = json.dumps(dict(task.preprocessing), sort_keys=True)
        if key not in done:
            done[key] = preprocess_file(path, task.preprocessing)
        out.append(done[key])
    return out


def classify(
    serving: TaskSet, files: Sequence[Path], top_k: int, progress: bool = False
) -> Iterator[dict[str, Any]]:
    """Results per (file, task), in file order; an unreadable file gives one error record."""
    from tqdm import tqdm

    tasks = serving.tasks
    per_batch = max(1, serving.batch_size // len(tasks))
    bar = tqdm(total=len(files), unit="image", disable=not progress, file=sys.stderr)
    with bar:
        for start in range(0, len(files), per_batch):
            chunk, images, ids, errors = files[start : start + per_batch], [], [], {}
            for path in chunk:
                try:
                    images += _prepared(path, tasks)
                    ids += list(range(len(tasks)))
                except Exception as e:  # Pillow raises several types for broken files
                    errors[path] = f"cannot read this image ({type(e).__name__}: {e})"
            top = iter(serving.predict(np.stack(images), ids, top_k) if images else [])
            for path in chunk:
                if path in errors:
                    yield {"file": shown(path), "error": errors[path]}
                    continue
                for task in tasks:
                    yield {"file": shown(path), "task": task.name, "predictions": [
                        {"class": p.name, "index": p.index, "probability": p.probability}
                        for p in next(top)
                    ]}  # fmt: skip
            bar.update(len(chunk))


def _line(record: dict[str, Any]) -> str:
    if "error" in record:
        return f"{record['file']}: error: {record['error']}"
    best = ", ".join(f"{p['class']} ({p['probability']:.3f})" for p in record["predictions"])
    return f"{record['file']}\t{record['task']}\t{best}"


def main(argv: Sequence[str] | None = None, prog: str = "apj predict") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--task", action="append", required=True,
                        help="an exported task directory (repeat for several tasks)")  # fmt: skip
    parser.add_argument("--backbone", help="the backbone: a ported directory or timm name "
                        "(default: the one each task records)")  # fmt: skip
    parser.add_argument("--weights-dir", help="where ported timm names live")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="images x tasks per forward")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be positive")
    files, missing, folders = collect(args.inputs)
    for item, message in missing:
        print(f"{prog}: {item}: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"file": item, "error": message}), flush=True)
    if not files:
        print(f"{prog}: error: no images to classify", file=sys.stderr)
        return 2
    from adapter_plus_jax import console

    console.quiet_libraries()
    try:
        serving = load_tasks(args.task, args.backbone, args.weights_dir, args.dtype,
                             args.batch_size)  # fmt: skip
    except (ValueError, OSError) as e:  # SetupError included: bad task, foreign backbone
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    failed = bool(missing)
    for record in classify(serving, files, args.top_k, progress=folders):
        failed |= "error" in record
        if args.json:
            text, stream = json.dumps(record), sys.stdout
        elif "error" in record:
            text, stream = f"{prog}: " + _line(record), sys.stderr
        else:
            text, stream = _line(record), sys.stdout
        tqdm.write(text, file=stream)  # keeps the line clear of the progress bar
        stream.flush()
    return 1 if failed else 0


if __name__ == "__main__":  # the same as `apj predict`
    sys.exit(main(prog="python -m adapter_plus_jax.predict"))

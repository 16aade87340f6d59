"""Writes an example checkpoint with facebook/opt-125m's tensor names and shapes (196 tensors,
random values) using the reference safetensors library. Nothing is downloaded."""
import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests" / "integration"))
from checkpoints import write_opt_like  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("directory")
parser.add_argument("--dtype", default="float16")
args = parser.parse_args()
write_opt_like(args.directory, dtype=args.dtype)
print(f"wrote {args.directory}/model.safetensors (OPT-125m shapes, {args.dtype})")

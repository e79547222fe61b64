"""Export a trained SALMONN as a folder that peft reads (models/checkpoint.py): the LoRA adapter for the plain LLM, and
the speech connector beside it in safetensors. `model.ckpt: DIR` loads it back.

    python -m scripts.export_adapter --cfg-path configs/demo.yaml --out outputs/demo/adapter
    python -m scripts.export_adapter --cfg-path configs/config.yaml --ckpt outputs/run/checkpoint_best.pth \
        --out outputs/run/adapter
"""
from __future__ import annotations

import argparse
import sys

from config import ConfigError, add_config_arguments, load_config
from models.checkpoint import CheckpointError, check_new_folder, export_adapter
from models.salmonn import SALMONN
from utils import error_message


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap, "the model's config (several are merged in order)", required=True)
    ap.add_argument("--out", required=True, help="folder to write (must not exist yet, or be empty)")
    ap.add_argument("--ckpt", default=None, help="the checkpoint to export (default: the config's model.ckpt)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.cfg_path, args.options, required_sections=("model",))
    if args.ckpt is not None:
        cfg.model.ckpt = args.ckpt
    if not cfg.model.ckpt:
        raise ConfigError("no checkpoint to export: give --ckpt PATH or set model.ckpt")
    if cfg.model.lora_scaling is not None:
        raise ConfigError("model.lora_scaling is an inference setting the adapter does not carry (peft scales by "
                          "lora_alpha / r): unset it to export")
    check_new_folder(args.out)  # before the model loads
    model = SALMONN.from_config(cfg.model)
    out = export_adapter(model, args.out, source=str(cfg.model.ckpt))
    print(f"wrote {out}: the LoRA adapter (peft) and connector.safetensors, from {cfg.model.ckpt}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """main() for the command line: a user mistake is one line, not a traceback."""
    try:
        return main(argv)
    except (ConfigError, FileNotFoundError, FileExistsError, CheckpointError, ValueError) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())

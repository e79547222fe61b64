"""Predicted peak GPU memory of SALMONN training or inference, item by item (memory_plan.py; docs/memory.md).

    python -m scripts.memory_plan --llm 13b --batch 2                          # training, GC off and on, 1 GPU
    python -m scripts.memory_plan --llm 7b --batch 4 --gpus 4 --strategy fsdp --gradient-checkpointing on
    python -m scripts.memory_plan --llm qwen2.5-7b --infer --batch 8 --beams 4 --answer-tokens 200
    python -m scripts.memory_plan --table                                      # the table of docs/memory.md

Dialogues are --turns user turns of --seconds each, in --mode: per_turn (one 30 s Whisper clip per turn, 88
speech tokens each), per_turn_trimmed (only the tokens of windows holding audio), packed (turns end to end in
shared clips), concat (the original fine-tune: one clip).
"""
from __future__ import annotations

import argparse
import sys

from tools import memory_plan as mp


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", choices=(*mp.TABLE_LLMS, "all"), default="all",
                    help="Vicuna 7b/13b (the released checkpoints) or a Qwen LLM")
    ap.add_argument("--batch", type=int, default=1, help="dialogues per GPU (training) or per generate call")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0, help="audio seconds per turn")
    ap.add_argument("--mode", choices=mp.MODES, default="per_turn")
    ap.add_argument("--gradient-checkpointing", choices=("on", "off", "both"), default="both")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    ap.add_argument("--infer", action="store_true", help="generation instead of training")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--answer-tokens", type=int, default=200)
    ap.add_argument("--table", action="store_true", help="print docs/memory.md's table (markdown) and stop")
    args = ap.parse_args(argv)
    for name in ("batch", "turns", "gpus", "beams", "answer_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seconds <= 0:
        ap.error(f"--seconds must be > 0, got {args.seconds}")
    if args.strategy == "fsdp" and args.gpus < 2:
        ap.error("--strategy fsdp shards over several GPUs: give --gpus 2 or more")
    return args


def fits_line(plan: mp.Plan) -> str:
    marks = ", ".join(f"{gpu} {'yes' if plan.fits(size) else 'no'}" for gpu, size in mp.GPU_GIB.items())
    return f"  fits (<= {1 - mp.FIT_MARGIN:.0%} of each GPU's memory): {marks}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(mp.table_markdown(args.turns, args.seconds))
        return 0
    dialogue = mp.Dialogue.uniform(args.turns, args.seconds, args.mode)
    checkpointing = {"on": [True], "off": [False], "both": [False, True]}[args.gradient_checkpointing]
    for llm in mp.TABLE_LLMS if args.llm == "all" else (args.llm,):
        shape = mp.released_shape(llm)
        if args.infer:
            plans = [mp.inference_plan(shape, dialogue, args.batch, args.beams, args.answer_tokens,
                                       title=f"SALMONN ({llm}) inference")]
        else:
            plans = [mp.training_plan(shape, dialogue, args.batch, gc, args.gpus, args.strategy,
                                      title=f"SALMONN ({llm}) training") for gc in checkpointing]
        for plan in plans:
            print(plan.format())
            print(fits_line(plan))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

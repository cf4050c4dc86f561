"""`python -m capdpo <command> [--help]`: the tools beside the numbered stage scripts.

Each command is a module's `main(argv)`; the table below is the whole list.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "sft": ("capdpo.training.sft", "main", "supervised fine-tuning on (image, prompt, response) records"),
    "import": ("capdpo.formats.interop", "main", "other tools' preference data as 05_pairs.jsonl"),
    "data-report": ("capdpo.pairs.report", "main", "an HTML page of a run's pairs and stage statistics"),
    "prepare-round": ("capdpo.training.rounds", "main", "write round k's config of iterative DPO"),
    "average-adapters": ("capdpo.models.adapters", "average_main", "the weighted mean of LoRA adapters"),
    "compose-adapters": ("capdpo.models.adapters", "compose_main", "one adapter with the update of two"),
    "tiny": ("capdpo.models.tiny", "main", "build the tiny random-weight test models"),
    "truth-report": ("capdpo.synthetic.truth_report", "main", "check a synthetic-world run against the truth"),
    "experiment": ("capdpo.synthetic.experiment", "main", "the synthetic world's before/after experiment"),
    "build-synthetic": ("capdpo.synthetic.build", "main", "train the synthetic world's tiny models"),
    "evaluate-synthetic": ("capdpo.synthetic.evaluate", "main", "a synthetic model on held-out images"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return "usage: python -m capdpo <command> [--help]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    if args[0] not in COMMANDS:
        print(f"error: unknown command '{args[0]}'\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module, function, _ = COMMANDS[args[0]]
    sys.argv = [f"python -m capdpo {args[0]}", *args[1:]]
    getattr(importlib.import_module(module), function)(args[1:])


if __name__ == "__main__":
    main()

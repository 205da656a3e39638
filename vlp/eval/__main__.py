"""`python -m vlp.eval retrieval|zeroshot ...`: the entry the DeepSpeed launcher starts on every rank
(`deepspeed --num_gpus N --module vlp.eval retrieval ...`); the launcher's `--local_rank` is ignored
(the rank comes from the environment)."""
import sys

from vlp.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())

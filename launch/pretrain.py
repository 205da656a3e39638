#!/usr/bin/env python
"""Each rank's entry: `deepspeed --num_gpus N launch/pretrain.py --config CFG [key=value ...]`.

Also runs as `python launch/pretrain.py --config CFG` (a world of one) or under torchrun; the
`--local_rank=N` the DeepSpeed launcher appends is accepted. All logic lives in `vlp.train`.
"""
import sys

from vlp.train.cli import pretrain_main

if __name__ == "__main__":
    sys.exit(pretrain_main())

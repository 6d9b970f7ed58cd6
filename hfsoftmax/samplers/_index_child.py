"""Entry point of a process sampler's index process: ``python -m
hfsoftmax.samplers._index_child FD PARENT_PID`` (started by
:class:`hfsoftmax.samplers.process.ProcessSampler`; FD is its end of a socketpair)."""
import sys

from hfsoftmax.samplers.process import _child_main

if __name__ == "__main__":
    _child_main(int(sys.argv[1]), int(sys.argv[2]))

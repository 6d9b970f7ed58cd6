"""``python -m tests.fake_cuda_train ...``: the trainer on a machine that claims CUDA (two
GPUs) but is asked for ``--device cpu``: what torchrun runs in tests/test_train_runtime.py.
Any use of a GPU would fail here (there is none), so a run that trains shows that nothing
picked CUDA behind the flag's back (the backend, pinned memory, the scaler, ...)."""
import sys

import torch

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 2

if __name__ == "__main__":
    from hfsoftmax.train import main

    sys.exit(main())

"""What the GPU test modules share (not a test module itself; they import it as
``tests.gpu_common``: ``tests`` and its folders are packages, and pytest's default import mode puts
the repository root, above them, on ``sys.path``).

Each GPU module sits beside the CPU tests of the package part it checks, each against the CPU: the
random walk, sparse and truncated, and ``walk_labels`` (``core/test_gpu_walk.py``); CAMs and the
walk from a ``num_gpus=1`` Ray actor (``stages/test_gpu_labels.py``); trainer steps under fp16
(grad scaler) and bf16, the trainer under AMP, SyncBatchNorm under DDP and NCCL collectives
(``stages/test_gpu_training.py``); the VOC / COCO rehearsal configs cut to a few images
(``pipeline/test_gpu_rehearsal.py``). Every such test is marked ``gpu`` and skips only where
CUDA is absent; ``bash launch/gpu_check.sh`` runs them (``pytest -m gpu``) with the GPU benchmarks.
Each module also runs its comparison helpers on the CPU, unmarked, so that their code runs with the
rest of the suite.

Where a result is compared with the CPU's, the tolerance comes from float32's unit roundoff
``u = 2^-24`` (the walk: elementwise ops only), or from TF32's ``2^-11`` where cuDNN convolutions
run (PyTorch's default ``torch.backends.cudnn.allow_tf32 = True``, which the project keeps).
"""
import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is absent")

U32 = 2.0 ** -24           # float32 unit roundoff
U_TF32 = 2.0 ** -11        # TF32 (10-bit mantissa): cuDNN's convolutions by default
CUDA = "cuda"

"""Tests run tiny convolutions: one intra-op thread avoids thread-pool contention on 2-core CI."""

import torch

torch.set_num_threads(1)

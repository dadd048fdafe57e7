import os

import pytest
import torch

# Two cores: one torch thread per test process keeps timings stable and leaves a core for subprocesses.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def digits():
    """scikit-learn's bundled digits (real 8×8 images), 75/25 stratified split, as TensorDatasets."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=d.target)
    return torch.utils.data.TensorDataset(x[tr], y[tr]), torch.utils.data.TensorDataset(x[te], y[te])

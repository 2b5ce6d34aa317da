import pytest
import torch

from bench.errors import ConfigError
from methods.common.hadamard import hadamard_matrix, random_hadamard, rotate_blocks


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 576, 640, 1536])
def test_orthonormal_with_equal_magnitudes(n: int) -> None:
    h = hadamard_matrix(n, dtype=torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


def test_random_hadamard_depends_on_seed_and_stays_orthonormal() -> None:
    a, b = random_hadamard(64, seed=0, dtype=torch.float64), random_hadamard(64, seed=1, dtype=torch.float64)
    assert not torch.equal(a, b)
    assert torch.allclose(a @ a.T, torch.eye(64, dtype=torch.float64), atol=1e-12)


def test_block_rotation_round_trips() -> None:
    x = torch.randn(3, 96, dtype=torch.float64)
    r = random_hadamard(32, seed=3, dtype=torch.float64)
    assert torch.allclose(rotate_blocks(rotate_blocks(x, r), r.T), x, atol=1e-12)


def test_unknown_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="size 18"):
        hadamard_matrix(18)

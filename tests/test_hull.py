"""The nearest point of a convex hull (``control_levels: hull``) against scipy's constrained least squares in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from perturbdiff_core.diffusion.hull import explained_by_hull, hull_weights, nearest_in_hull, project_to_simplex


def reference_weights(point: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """argmin ||w V - p||^2 over the simplex: Lawson-Hanson non-negative least squares (exact active
    set) with the sum-to-one constraint as a heavily weighted extra equation."""
    weight = 1e6 * (1 + np.abs(vertices).max())
    a = np.vstack([vertices.T, np.full(len(vertices), weight)])
    w, _ = nnls(a, np.append(point, weight), maxiter=50 * len(vertices))
    return w / w.sum()


def assert_optimal(w: np.ndarray, point: np.ndarray, vertices: np.ndarray, tol: float) -> None:
    """The KKT conditions of the simplex-constrained least squares: the gradient is smallest, and equal,
    on every vertex with weight, and no smaller on any other."""
    gradient = (w @ vertices - point) @ vertices.T
    scale = np.abs(gradient).max() + 1
    used = w > 1e-9
    assert np.ptp(gradient[used]) <= tol * scale
    assert gradient.min() >= gradient[used].min() - tol * scale


def objective(w: np.ndarray, point: np.ndarray, vertices: np.ndarray) -> float:
    return float(((w @ vertices - point) ** 2).sum())


def test_simplex_projection_is_the_nearest_point_of_the_simplex() -> None:
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.normal(scale=2.0, size=(20, 7)))
    projected = project_to_simplex(w)
    assert (projected >= 0).all()
    torch.testing.assert_close(projected.sum(-1), torch.ones(20, dtype=torch.float64))
    eye = np.eye(7)
    for row, got in zip(w.numpy(), projected.numpy()):  # the projection is the hull of the unit vectors' nearest point
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(reference_weights(row, eye)), atol=1e-6, rtol=0)
    torch.testing.assert_close(project_to_simplex(projected), projected)  # a point of the simplex stays


@pytest.mark.parametrize(("k", "genes", "spread"), [(2, 30, 1.0), (6, 1000, 0.3), (32, 200, 0.3), (5, 3, 1.0)])
def test_hull_weights_match_constrained_least_squares(k: int, genes: int, spread: float) -> None:
    """Vertices around a shared profile (like cell types' means: one large common part, so the Gram
    matrix is ill-conditioned), points outside the hull, inside it, and at a vertex."""
    rng = np.random.default_rng(k)
    base = rng.uniform(0, 3, genes)
    vertices = base + spread * rng.normal(size=(k, genes))
    points = base + 0.5 * rng.normal(size=(6, genes))
    inside = rng.dirichlet(np.ones(k))
    points[0], points[1] = vertices[k - 1], inside @ vertices
    weights = hull_weights(torch.from_numpy(points), torch.from_numpy(vertices)).numpy()
    assert (weights >= 0).all() and np.allclose(weights.sum(-1), 1)
    for point, got in zip(points, weights):
        best = objective(reference_weights(point, vertices), point, vertices)
        assert objective(got, point, vertices) <= best + 1e-7 * (1 + best)
        assert_optimal(got, point, vertices, tol=1e-5)
    nearest = nearest_in_hull(torch.from_numpy(points), torch.from_numpy(vertices)).numpy()
    np.testing.assert_allclose(nearest[:2], points[:2], atol=1e-6)  # a point of the hull is its own nearest point


def test_nearest_in_hull_keeps_the_points_shape_and_dtype() -> None:
    vertices = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    points = torch.randn(3, 1, 10, generator=torch.Generator().manual_seed(2))
    nearest = nearest_in_hull(points, vertices)
    assert nearest.shape == points.shape and nearest.dtype == torch.float32
    single = nearest_in_hull(points, vertices[:1])  # one context: every point moves to it
    torch.testing.assert_close(single, vertices[:1].expand(3, 1, 10))


def test_explained_share_follows_its_closed_form() -> None:
    """1 for a point of the hull; for a vertex moved by t along a direction orthogonal to the hull's
    span, 1 - t^2 |o|^2 / (|v - mean|^2 + t^2 |o|^2); 0 for the vertices' average moved that way."""
    vertices = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    average = vertices.mean(0)
    away = torch.tensor([0.0, 0.0, 1.5, -0.5], dtype=torch.float64)
    points = torch.stack([0.2 * vertices[0] + 0.8 * vertices[1], vertices[1] + away, average + away])
    offset = (vertices[1] - average).pow(2).sum()
    expected = torch.stack([torch.tensor(1.0, dtype=torch.float64), 1 - away.pow(2).sum() / (offset + away.pow(2).sum()),
                            torch.tensor(0.0, dtype=torch.float64)])
    torch.testing.assert_close(explained_by_hull(points, vertices), expected)

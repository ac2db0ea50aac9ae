"""The cost surface's path of gradient descent stays bounded in memory however long the run."""

from __future__ import annotations

import numpy as np
import torch

from trainer.figures import PATH_CHUNK, PATH_POINTS, Figures


def test_the_path_keeps_its_start_its_newest_point_and_at_most_path_points() -> None:
    figures = Figures()
    figures._path, figures._path_host = [], np.zeros((0, 2))
    steps = 5 * PATH_POINTS + 3
    for step in range(steps):
        figures._path.append(torch.tensor([float(step), -float(step)]))
        if len(figures._path) >= PATH_CHUNK:
            figures._path_to_host()
        assert len(figures._path) < PATH_CHUNK  # the device side never holds more than a chunk
    figures._path_to_host()
    path = figures._path_host
    assert len(path) <= PATH_POINTS
    assert path[0].tolist() == [0.0, 0.0] and path[-1].tolist() == [steps - 1.0, 1.0 - steps]
    assert np.all(np.diff(path[:, 0]) > 0)  # still in the order gradient descent took

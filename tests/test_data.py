"""Data modules: widths, splits, batching by index, reshuffling, CSV parsing."""

from __future__ import annotations

import pytest
import torch

from trainer.data import ClassificationData, CSVData, DataError, IndexBatches, LineData, RegressionData


def _ids(batches):
    return [b[0][:, 0].tolist() for b in batches]


def test_full_batch_is_the_whole_set_in_order():
    x = torch.arange(10.0).reshape(-1, 1)
    batches = IndexBatches(x, x, batch_size=None)
    assert len(batches) == 1
    ((bx, by),) = list(batches)
    assert torch.equal(bx, x) and torch.equal(by, x)


def test_minibatches_cover_every_example_once_per_epoch_and_reshuffle():
    x = torch.arange(10.0).reshape(-1, 1)
    batches = IndexBatches(x, x, batch_size=3, seed=5)
    assert len(batches) == 4
    epochs = [_ids(list(batches)) for _ in range(3)]
    for epoch in epochs:
        assert sorted(v for b in epoch for v in b) == list(range(10))
        assert [len(b) for b in epoch] == [3, 3, 3, 1]
    assert epochs[0] != epochs[1] != epochs[2]


def test_batch_order_is_reproducible_from_the_seed():
    x = torch.arange(20.0).reshape(-1, 1)
    a = [_ids(list(IndexBatches(x, x, 4, seed=1))) for _ in range(1)]
    b = [_ids(list(IndexBatches(x, x, 4, seed=1))) for _ in range(1)]
    c = [_ids(list(IndexBatches(x, x, 4, seed=2))) for _ in range(1)]
    assert a == b and a != c


def test_state_dict_resumes_mid_epoch_on_the_next_batch():
    x = torch.arange(12.0).reshape(-1, 1)
    full = IndexBatches(x, x, 3, seed=0)
    reference = _ids(list(full)) + _ids(list(full))  # two epochs
    first = IndexBatches(x, x, 3, seed=0)
    it = iter(first)
    taken = _ids([next(it), next(it)])
    resumed = IndexBatches(x, x, 3, seed=0)
    resumed.load_state_dict(first.state_dict())
    rest = _ids(list(resumed)) + _ids(list(resumed))
    assert taken + rest == reference


def test_line_data_lies_on_its_line():
    d = LineData(slope=3.0, intercept=-2.0, noise=0.0, n=50)
    torch.testing.assert_close(d.y_train, 3.0 * d.x_train - 2.0)
    assert (d.in_features, d.out_features) == (1, 1)


def test_line_data_takes_points_from_the_config():
    d = LineData(x=[0.5, 2.3, 2.9], y=[1.4, 1.9, 3.2])
    assert d.x_train.flatten().tolist() == pytest.approx([0.5, 2.3, 2.9])
    with pytest.raises(DataError, match="data.x and data.y"):
        LineData(x=[1.0])


def test_split_holds_out_the_val_fraction_without_overlap():
    d = RegressionData(n=100, val_fraction=0.25)
    assert d.x_train.shape[0] == 75 and d.x_val.shape[0] == 25
    rows = {tuple(r) for r in torch.cat([d.x_train, d.x_val]).tolist()}
    assert len(rows) == 100


@pytest.mark.parametrize("dataset", ClassificationData.DATASETS)
def test_classification_data_is_balanced_2d(dataset):
    d = ClassificationData(dataset=dataset, n=300, classes=3)
    assert d.in_features == 2
    k = 2 if dataset == "moons" else 3
    assert d.out_features == k
    counts = torch.bincount(torch.cat([d.y_train, d.y_val]), minlength=k)
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
    ],
)
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(DataError, match=key):
        RegressionData(**kwargs)


def test_val_fraction_that_leaves_no_training_data_is_refused():
    with pytest.raises(DataError, match="no training data"):
        RegressionData(n=1, val_fraction=0.9)


def _csv(tmp_path, text, name="d.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_standardizes_features_with_training_statistics(tmp_path):
    rows = "\n".join(f"{i},{10 * i + 3},{2 * i}" for i in range(40))
    d = CSVData(_csv(tmp_path, "a,b,y\n" + rows + "\n"), targets=["y"], val_fraction=0.25)
    torch.testing.assert_close(d.x_train.mean(0), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(d.x_train.std(0, correction=0), torch.ones(2), atol=1e-6, rtol=0)
    assert d.feature_names == ["a", "b"]
    # targets are left as they are: y = 2·a on every row, train or val
    raw_a = d.x_train[:, 0] * d.std[0] + d.mean[0]
    torch.testing.assert_close(d.y_train[:, 0], 2 * raw_a, atol=1e-4, rtol=0)


def test_csv_classification_maps_labels_to_indices(tmp_path):
    text = "x1,x2,label\n" + "\n".join(f"{i},{i % 3},{'cat' if i % 2 else 'dog'}" for i in range(20)) + "\n"
    d = CSVData(_csv(tmp_path, text), targets="label", classification=True, val_fraction=0.0)
    assert d.classes == ["cat", "dog"]
    assert d.out_features == 2
    assert d.y_train.dtype == torch.long


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("a,y\n", "no rows"),
        ("a,y\n1,2\n3,oops\n", "row 3, column 'y': 'oops' is not a number"),
        ("a,y\n1,2\n3,nan\n", "not finite"),
        ("a,y\n1,2\n3,inf\n", "not finite"),
        ("a,y\n1,2,3\n", "3 cells where the header has 2"),
        ("a,y\n1\n", "1 cells where the header has 2"),
        ("a,b\n1,2\n", "no target column 'y'; the columns are a, b"),
    ],
)
def test_csv_errors_say_what_and_where(tmp_path, text, needle):
    with pytest.raises(DataError, match=needle.replace("(", r"\(")):
        CSVData(_csv(tmp_path, text), targets=["y"])


def test_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        CSVData(tmp_path / "nope.csv")


def test_csv_single_class_is_refused(tmp_path):
    with pytest.raises(DataError, match="one class only"):
        CSVData(_csv(tmp_path, "x,label\n1,a\n2,a\n"), targets="label", classification=True, val_fraction=0.0)

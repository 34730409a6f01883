import gzip
import pickle

import numpy as np
import pytest
import torch

from mode_ray.train.data import _NumpyOnlyUnpickler, load_dataset, load_mnist, load_npz
from mode_ray.train.partitions import PartitionSpec, partition, shard


@pytest.fixture(scope="module")
def mnist():  # noqa: ANN201
    return load_mnist("train")


def test_full_mnist_ships_offline(mnist) -> None:  # noqa: ANN001
    test = load_mnist("test")
    assert mnist.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert mnist.images.min() == -1 and mnist.images.max() <= 1
    assert torch.bincount(mnist.labels).min() > 5000


def test_restricted_unpickler_admits_only_numpy_arrays(tmp_path) -> None:  # noqa: ANN001
    ok = tmp_path / "ok.pkl.gz"
    with gzip.open(ok, "wb") as f:
        pickle.dump((np.arange(3), np.zeros(2)), f)
    with gzip.open(ok, "rb") as f:
        a, b = _NumpyOnlyUnpickler(f).load()
    assert a.tolist() == [0, 1, 2]
    evil = tmp_path / "evil.pkl.gz"
    with gzip.open(evil, "wb") as f:
        pickle.dump(print, f)
    with gzip.open(evil, "rb") as f, pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        _NumpyOnlyUnpickler(f).load()


def test_user_npz_and_image_folder(tmp_path) -> None:  # noqa: ANN001
    from PIL import Image

    np.savez(tmp_path / "d.npz", images=np.full((4, 8, 8), 255, np.uint8), labels=np.array([0, 1, 1, 0]))
    d = load_npz(tmp_path / "d.npz")
    assert d.images.shape == (4, 1, 8, 8) and d.images.max() == 1 and d.class_names == ("0", "1")
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("L", (10, 10), 128).save(tmp_path / "imgs" / cls / "a.png")
    f = load_dataset(str(tmp_path / "imgs"))
    assert f.images.shape == (2, 1, 28, 28) and f.class_names == ("cat", "dog")
    np.savez(tmp_path / "bad.npz", pixels=np.zeros(3))
    with pytest.raises(ValueError, match="needs an array named 'images'"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="dataset must be"):
        load_dataset("imagenet")


def test_label_partitions(mnist) -> None:  # noqa: ANN001
    parts = partition(mnist, "labels:0,6|1,4,7|2,3,5|8,9")
    assert sum(len(p) for p in parts) == len(mnist)
    assert set(mnist.labels[parts[1]].unique().tolist()) == {1, 4, 7}
    assert PartitionSpec.parse("labels:0,6|1,4,7").shard_spec(1) == "labels:1,4,7"
    assert PartitionSpec.parse("labels:0,6|1").groups == ((0, 6), (1,))
    for bad in ("labels:0,6|6,1", "labels:0,x", "labels:0||1", "labels:-1"):
        with pytest.raises(ValueError, match="partition groups"):
            PartitionSpec.parse(bad)


def test_partition_specs_round_trip_and_rebuild_from_shards() -> None:
    for spec in ("all", "labels:0,6|1,4,7|2,3,5|8,9", "kmeans:4"):
        assert str(PartitionSpec.parse(spec)) == spec
    p = PartitionSpec.parse("labels:0,6|1,4,7")
    assert [p.shard_name(i) for i in range(p.num_shards)] == ["digits-0-6", "digits-1-4-7"]
    shards = [p.shard_spec(i) for i in range(p.num_shards)]
    assert PartitionSpec.of_shards(shards) == p  # what the gate rebuilds from the experts' cards
    k = PartitionSpec.parse("kmeans:3")
    assert PartitionSpec.of_shards([k.shard_spec(i) for i in range(3)]) == k
    with pytest.raises(ValueError, match="clusters 0..k-1"):
        PartitionSpec.of_shards(["kmeans:3:1", "kmeans:3:0", "kmeans:3:2"])  # out of order
    with pytest.raises(ValueError, match="disjoint"):
        PartitionSpec.of_shards(["labels:0,6", "labels:6"])  # a hot-added copy overlapping a known shard
    with pytest.raises(ValueError, match=r"shard index must be in \[0, 1\]"):
        p.shard_spec(2)


def test_kmeans_partition_covers_the_data(mnist) -> None:  # noqa: ANN001
    small = mnist.subset(torch.arange(3000))
    parts = partition(small, "kmeans:4")
    assert sorted(torch.cat(parts).tolist()) == list(range(3000))
    assert all(len(p) > 100 for p in parts)
    assert torch.equal(parts[0], partition(small, "kmeans:4")[0])  # deterministic for a seed
    assert len(shard(small, "kmeans:4", 2)) == len(parts[2])
    with pytest.raises(ValueError, match="partition must be"):
        partition(small, "random:4")

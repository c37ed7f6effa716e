"""FID and KID: the Fréchet distance and KID against closed forms and a direct loop, the feature pipeline on a
stand-in network, and pytorch-fid's Inception: its layout, its input (299 px, [-1, 1]), its TensorFlow pools,
and the weights loader (hash, keys, torch.hub cache, offline). The network runs on a few tiny images only: at
299 px it costs about 6 GFLOP per image. Nothing here reaches the network."""
import hashlib
import shutil
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.inception import Inception3

import fastgan.metrics.inception
from fastgan.errors import FastganError
from fastgan.metrics.fid import feature_statistics, frechet_distance, inception_features, kernel_inception_distance
from fastgan.metrics.inception import (FEATURES, FID_WEIGHTS_FILE, FID_WEIGHTS_URL, FIDInceptionA, FIDInceptionC, FIDInceptionE_1,
                               FIDInceptionE_2, build_inception, hub_checkpoint, load_inception)


# --- Fréchet distance ---------------------------------------------------------------------------------------

def random_covariance(rng, dims):
    a = rng.standard_normal((dims, dims))
    return a @ a.T / dims + 0.1 * np.eye(dims)


def test_frechet_distance_of_equal_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(64), random_covariance(rng, 64)
    # rounding of two 64x64 eigendecompositions, against traces of about 64
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_of_singular_covariances_is_finite():
    """2048 features from fewer images give singular covariances: their zero eigenvalues come out of eigh as
    tiny negatives, whose square roots must count as 0 (not NaN)."""
    rng = np.random.default_rng(1)
    mu, sigma = feature_statistics(rng.standard_normal((20, 64)))  # rank 19 in 64 dimensions
    # not 1e-9 here: the 45 zero eigenvalues of S S come out of eigh at rounding level, ~1e-16 x the largest
    # (~10), and each adds its square root, ~3e-8, to tr(covmean); measured 2.4e-6 in all, against tr(S) = 64
    # (and 1.8e-5 against 744 for 2048 features of 1,000 images). NaN without the clamp.
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-5)


def test_frechet_distance_of_diagonal_covariances():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_non_commuting_covariances():
    """A 2x2 A with positive eigenvalues has tr(sqrtm(A)) = sqrt(tr A + 2 sqrt(det A)) (the eigenvalues' square
    roots summed and squared): an answer computed without any eigendecomposition."""
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[1.0, -0.4], [-0.4, 3.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 2.0])
    product = s1 @ s2
    tr_covmean = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_feature_statistics_are_numpys_unbiased_ones():
    features = np.random.default_rng(3).standard_normal((10, 4))
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
    centred = features - features.mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / 9, rtol=1e-12)  # N - 1, as np.cov and pytorch-fid
    with pytest.raises(FastganError, match="at least 2 images"):
        feature_statistics(features[:1])


# --- KID ----------------------------------------------------------------------------------------------------

def kid_by_loops(real, fake, num_subsets, max_subset_size, seed):
    """The unbiased MMD^2 of the cubic kernel written element by element, subsets drawn as fastgan draws them."""
    dims = real.shape[1]
    kernel = lambda a, b: (a @ b / dims + 1) ** 3
    m = min(len(real), len(fake), max_subset_size)
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(num_subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
        estimates.append(xx + yy - 2 * xy)
    return np.mean(estimates)


def test_kid_is_the_unbiased_mmd_of_the_cubic_kernel():
    rng = np.random.default_rng(4)
    real, fake = rng.standard_normal((15, 6)), rng.standard_normal((12, 6)) + 0.3
    expected = kid_by_loops(real, fake, num_subsets=3, max_subset_size=10, seed=7)
    assert kernel_inception_distance(real, fake, num_subsets=3, max_subset_size=10, seed=7) == \
        pytest.approx(expected, rel=1e-10)


def test_kid_is_about_zero_for_one_distribution_and_positive_for_shifted_features():
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((400, 32)), rng.standard_normal((400, 32))
    same = kernel_inception_distance(real, fake, num_subsets=20, max_subset_size=200)
    shifted = kernel_inception_distance(real, fake + 0.5, num_subsets=20, max_subset_size=200)
    # for these features (x.y / 32 + 1 near 1) a mean shift of 0.5 per dimension gives about 0.5, while the
    # sampling noise of one distribution against itself is about 0.01
    assert abs(same) < 0.03
    assert shifted > 0.3
    assert kernel_inception_distance(real, fake, seed=1, num_subsets=5) == \
        kernel_inception_distance(real, fake, seed=1, num_subsets=5)


# --- the feature pipeline -----------------------------------------------------------------------------------

class StandIn(torch.nn.Module):
    """The FIDInceptionV3 call contract, features = each channel's mean: records what it is given."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, images):
        self.inputs.append(images.clone())
        return images.mean(dim=(2, 3))


def test_inception_features_scales_to_unit_range_repeats_grayscale_and_keeps_order():
    rng = np.random.default_rng(6)
    rgb = [torch.from_numpy(rng.integers(0, 256, (n, 3, 5, 7), dtype=np.uint8)) for n in (4, 3)]
    gray = torch.from_numpy(rng.integers(0, 256, (2, 1, 5, 7), dtype=np.uint8))
    model, seen = StandIn().train(), []
    features = inception_features(model, rgb + [gray], "cpu", progress=seen.append)
    assert not model.training  # BatchNorm in training mode would mix the images of a batch

    assert seen == [4, 3, 2]
    assert features.dtype == np.float64 and features.shape == (9, 3)
    expected = torch.cat(rgb + [gray.repeat(1, 3, 1, 1)]).double().div(255).mean(dim=(2, 3))
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-6)  # float32 means of 35 pixels
    assert all(x.dtype == torch.float32 and x.shape[1] == 3 for x in model.inputs)
    assert model.inputs[0].max() <= 1 and model.inputs[0].min() >= 0


def test_inception_features_refuses_float_images():
    with pytest.raises(ValueError, match="uint8"):
        inception_features(StandIn(), [torch.rand(2, 3, 4, 4)], "cpu")


# --- the network --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return build_inception().eval()


def test_layout_is_pytorch_fids(inception):
    """pytorch-fid builds torchvision's Inception3(num_classes=1008, aux_logits=False) and loads its file into
    that with strict=True: the same keys and shapes are the published file's."""
    ours = {k: v.shape for k, v in inception.state_dict().items()}
    theirs = {k: v.shape for k, v in Inception3(num_classes=1008, aux_logits=False,
                                                 init_weights=False).state_dict().items()}
    assert ours == theirs
    assert ours["fc.weight"] == (1008, 2048)
    assert ours["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert ours["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert ours["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert not any(k.startswith("AuxLogits") for k in ours)


def test_patched_blocks_pool_as_tensorflow(inception):
    """The TensorFlow graph's pool branches: average pools that leave the zero padding out (A, C, Mixed_7b) and
    a max pool in Mixed_7c. torchvision's own blocks count the padding in, which changes every border pixel."""
    blocks = {"Mixed_5b": FIDInceptionA, "Mixed_5c": FIDInceptionA, "Mixed_5d": FIDInceptionA,
              "Mixed_6b": FIDInceptionC, "Mixed_6c": FIDInceptionC, "Mixed_6d": FIDInceptionC,
              "Mixed_6e": FIDInceptionC, "Mixed_7b": FIDInceptionE_1, "Mixed_7c": FIDInceptionE_2}
    for name, kind in blocks.items():
        block = getattr(inception, name)
        assert type(block) is kind, name
        seen = []
        handle = block.branch_pool.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        x = torch.randn(1, block.branch1x1.conv.in_channels, 5, 5)
        with torch.no_grad():
            block(x)
        handle.remove()
        if name == "Mixed_7c":
            expected = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            expected = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        torch.testing.assert_close(seen[0], expected, msg=name)


def test_forward_resizes_to_299_bilinear_scales_to_minus_one_one_and_runs_every_layer(inception):
    images = torch.rand(1, 3, 16, 16)
    calls, inputs = [], {}
    layers = [name for name, _ in inception.named_children() if name != "fc"]  # Inception3's graph order
    handles = [getattr(inception, name).register_forward_hook(
        lambda module, args, out, name=name: calls.append(name)) for name in layers]
    handles.append(inception.Conv2d_1a_3x3.register_forward_pre_hook(
        lambda module, args: inputs.setdefault("first", args[0])))
    handles.append(inception.avgpool.register_forward_pre_hook(
        lambda module, args: inputs.setdefault("last", args[0])))
    with torch.no_grad():
        features = inception(images)
    for handle in handles:
        handle.remove()

    assert calls == [name for name in layers if name != "dropout"]
    expected_input = 2 * F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(inputs["first"], expected_input)
    assert inputs["last"].shape == (1, 2048, 8, 8)
    assert features.shape == (1, FEATURES) and features.dtype == torch.float32
    torch.testing.assert_close(features, inputs["last"].mean(dim=(2, 3)))


# --- loading the weights ------------------------------------------------------------------------------------

def sha256_of(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_weights(model, reference):
    loaded, saved = model.state_dict(), reference.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.fixture(scope="module")
def weights_file(inception, tmp_path_factory):
    """Random weights in the real key layout, named `name-<sha256 prefix>.pth` as torch.hub names files."""
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(inception.state_dict(), path)
    named = path.with_name(f"inception-{sha256_of(path)[:8]}.pth")
    path.rename(named)
    return named


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """torch.hub's cache in a fresh folder, and every download failing as it does without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would override TORCH_HOME

    def no_network(url, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert str(hub_checkpoint()).startswith(str(tmp_path))
    return hub_checkpoint()


def test_a_weights_file_with_its_hash_in_its_name_loads(weights_file, inception):
    model = load_inception(weights_file)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert_same_weights(model, inception)
    features = inception_features(model, [torch.zeros(1, 1, 8, 8, dtype=torch.uint8)], "cpu")
    assert features.shape == (1, FEATURES) and np.isfinite(features).all()


def test_a_weights_file_whose_hash_differs_from_its_name_is_refused(weights_file, tmp_path):
    wrong = tmp_path / FID_WEIGHTS_FILE  # the published name, over other weights: sha256 is not 6726825d...
    shutil.copy(weights_file, wrong)
    with pytest.raises(FastganError, match="6726825d") as error:
        load_inception(wrong)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("change, words", [
    (lambda sd: sd.pop("Mixed_7c.branch3x3dbl_3b.conv.weight"), "Mixed_7c.branch3x3dbl_3b.conv.weight"),
    (lambda sd: sd.update({"fc.weight": torch.zeros(1000, 2048)}), r"fc.weight is \(1000, 2048\)"),  # ImageNet's
    (lambda sd: sd.update({"AuxLogits.fc.weight": torch.zeros(1000, 768)}), "AuxLogits.fc.weight"),
])
def test_weights_of_another_network_are_refused_with_the_key(inception, tmp_path, change, words):
    state_dict = dict(inception.state_dict())
    change(state_dict)
    path = tmp_path / "other.pth"
    torch.save(state_dict, path)
    with pytest.raises(FastganError, match=words) as error:
        load_inception(path)
    assert "\n" not in str(error.value)


def test_no_file_and_no_network_names_the_file_the_folder_and_the_flag(offline_hub):
    with pytest.raises(FastganError) as error:
        load_inception()
    message = str(error.value)
    assert FID_WEIGHTS_FILE in message and str(offline_hub.parent) in message and "--inception PATH" in message
    assert "\n" not in message


def test_a_damaged_download_is_refused_in_one_line(offline_hub, monkeypatch):
    def damaged(url, path, hash_prefix, progress=True):
        assert hash_prefix == "6726825d"  # torch.hub was asked to check the download's hash
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "0b1c2d...")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", damaged)
    with pytest.raises(FastganError, match="invalid hash value") as error:
        load_inception()
    assert "\n" not in str(error.value)


def test_statistics_of_different_sizes_are_refused():
    with pytest.raises(FastganError, match="different sizes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_the_hub_caches_the_file_under_the_name_fastgan_names():
    assert FID_WEIGHTS_URL.endswith("/fid_weights/" + FID_WEIGHTS_FILE)


def test_a_file_in_the_hub_cache_is_used_without_downloading(offline_hub, weights_file, inception, monkeypatch):
    # random weights cannot carry the published name (its hash is checked, next test), so the cache holds them
    # under their own hash-suffixed name, and the URL ends in that name as the real one ends in its own
    monkeypatch.setattr(fastgan.metrics.inception, "FID_WEIGHTS_FILE", weights_file.name)
    monkeypatch.setattr(fastgan.metrics.inception, "FID_WEIGHTS_URL", "https://example.invalid/" + weights_file.name)
    cached = hub_checkpoint()
    cached.parent.mkdir(parents=True)
    shutil.copy(weights_file, cached)
    model = load_inception()  # every download raises: loading proves there was none
    assert_same_weights(model, inception)


def test_a_file_in_the_hub_cache_that_is_not_the_published_one_is_refused(offline_hub, weights_file):
    """torch.hub checks the hash of what it downloads only; users put this file in the cache by hand."""
    offline_hub.parent.mkdir(parents=True)
    shutil.copy(weights_file, offline_hub)
    with pytest.raises(FastganError, match="6726825d") as error:
        load_inception()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("torch_home, xdg, folder, spelled", [
    ("th", "xdg", "th/hub/checkpoints", "$TORCH_HOME/hub/checkpoints"),
    (None, "xdg", "xdg/torch/hub/checkpoints", "$XDG_CACHE_HOME/torch/hub/checkpoints"),
    (None, None, "home/.cache/torch/hub/checkpoints", "~/.cache/torch/hub/checkpoints"),
])
def test_docs_name_each_folder_eval_looks_in_for_the_weights(tmp_path, monkeypatch, torch_home, xdg, folder, spelled):
    """Where eval looks for the Inception weights (torch.hub's folder: TORCH_HOME, else XDG_CACHE_HOME, else ~/.cache)
    is the folder docs/evaluation.md names for that setting."""
    from pathlib import Path
    from fastgan.metrics.inception import hub_checkpoint
    for name, value in (("TORCH_HOME", torch_home), ("XDG_CACHE_HOME", xdg)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(tmp_path / value))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_checkpoint() == tmp_path / folder / FID_WEIGHTS_FILE
    page = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    assert f"`{spelled}`" in " ".join(page.split())

"""kdhpc.metrics against independent computations: scikit-image (test-only reference), scipy,
the statistics module, hand-written formulas and geometry, on fresh random volumes."""

from __future__ import annotations

import math
import os
import statistics
import tempfile

import numpy as np
import pytest
import scipy.ndimage as ndi
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from skimage.filters import laplace as skimage_laplace
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kdhpc import metrics

TOL = 1e-6


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: intra-op threads only add contention on a loaded 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"random seed {seed}")  # shown by pytest when a test fails
    return np.random.default_rng(seed)


def random_volume_pair(rng, shape, noise=0.05):
    """A smooth non-negative ground truth scaled to [0, 1] and a noisy prediction [S, H, W]."""
    gt = ndi.gaussian_filter(rng.random(shape), sigma=(0, 1.5, 1.5))
    gt = gt / gt.max()
    pred = gt + noise * rng.standard_normal(shape)
    return gt, pred


def close(value, reference, tol=TOL):
    return abs(value - reference) <= tol * max(1.0, abs(reference))


def skimage_volume_ssim(gt, pred, data_range, win_size=7):
    return np.mean([structural_similarity(g, p, data_range=data_range, win_size=win_size)
                    for g, p in zip(gt, pred)])


def kdmri_hfn(gt, pred):
    """KD-MRI's HFN with scikit-image 0.14's laplace (1-pixel frame zeroed), pred clipped."""
    ratios = []
    for g, p in zip(gt, np.clip(pred, 0.0, 1.0)):
        lg, lp = skimage_laplace(g), skimage_laplace(p)
        for filtered in (lg, lp):
            filtered[0, :] = filtered[-1, :] = filtered[:, 0] = filtered[:, -1] = 0.0
        ratios.append(np.sum((lg - lp) ** 2) / np.sum(lg ** 2))
    return np.mean(ratios)


# --- numpy volume metrics vs scikit-image -----------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 48, 40), (3, 7, 9)])
def test_volume_metrics_match_skimage(rng, shape):
    gt, pred = random_volume_pair(rng, shape)
    peak = gt.max()
    assert close(metrics.ssim(gt, pred), skimage_volume_ssim(gt, pred, peak))
    assert close(metrics.psnr(gt, pred), peak_signal_noise_ratio(gt, pred, data_range=peak))
    given = 1.7 * peak
    assert close(metrics.ssim(gt, pred, data_range=given), skimage_volume_ssim(gt, pred, given))
    assert close(metrics.psnr(gt, pred, data_range=given),
                 peak_signal_noise_ratio(gt, pred, data_range=given))
    assert close(metrics.nmse(gt, pred),
                 np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2)
    assert close(metrics.mse(gt, pred), np.mean((gt - pred) ** 2))


def test_ssim_other_window_matches_skimage(rng):
    gt, pred = random_volume_pair(rng, (2, 30, 33))
    assert close(metrics.ssim(gt, pred, win_size=5),
                 skimage_volume_ssim(gt, pred, gt.max(), win_size=5))


def test_psnr_of_identical_volumes_is_infinite(rng):
    gt, _ = random_volume_pair(rng, (2, 16, 16))
    assert metrics.psnr(gt, gt.copy()) == math.inf
    assert close(metrics.ssim(gt, gt.copy()), 1.0)


def test_hfen_matches_kdmri_definition(rng):
    gt, pred = random_volume_pair(rng, (4, 40, 36), noise=0.2)
    pred[0, 5, 5], pred[1, 7, 9] = -0.5, 1.5  # both clipping bounds are exercised
    assert close(metrics.hfen(gt, pred), kdmri_hfn(gt, pred))
    unclipped = metrics.hfen(gt, pred, clip=None)
    assert not close(unclipped, kdmri_hfn(gt, pred))


# --- torch metrics vs numpy -------------------------------------------------------------------

def test_ssim_torch_matches_numpy_per_slice(rng):
    gt, pred = random_volume_pair(rng, (6, 41, 38))
    x, y = torch.from_numpy(gt)[:, None], torch.from_numpy(pred)[:, None]  # [S, 1, H, W]
    per_slice = metrics.ssim_per_slice(gt, pred)
    values = metrics.ssim_torch(x, y, gt.max(), reduction="none")
    np.testing.assert_allclose(values.numpy(), per_slice, atol=1e-10)
    assert close(metrics.ssim_torch(x, y, gt.max()).item(), per_slice.mean())
    assert close(metrics.ssim_torch(x, y, gt.max(), reduction="sum").item(), per_slice.sum())
    # float32 training use, one data range per image
    ranges = torch.tensor([gt.max()] * 3 + [2 * gt.max()] * 3)
    values32 = metrics.ssim_torch(x.float(), y.float(), ranges.float(), reduction="none")
    expected = np.concatenate([metrics.ssim_per_slice(gt[:3], pred[:3], gt.max()),
                               metrics.ssim_per_slice(gt[3:], pred[3:], 2 * gt.max())])
    np.testing.assert_allclose(values32.numpy(), expected, atol=1e-4)


def test_ssim_torch_gradcheck():
    x = torch.rand(2, 1, 9, 10, dtype=torch.float64, requires_grad=True)
    y = (x.detach() + 0.1 * torch.randn_like(x)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: metrics.ssim_torch(a, b, 1.0, "none"), (x, y))


def test_ssim_torch_gradient_of_strided_input_matches_contiguous():
    base = torch.rand(2, 1, 20, 24, dtype=torch.float64)
    x = base[..., ::2, :].requires_grad_()  # non-contiguous [2, 1, 10, 24]
    xc = x.detach().contiguous().requires_grad_()
    y = torch.rand(2, 1, 10, 24, dtype=torch.float64)
    weights = torch.tensor([0.3, -1.7], dtype=torch.float64)
    (metrics.ssim_torch(x, y, 1.0, "none") * weights).sum().backward()
    (metrics.ssim_torch(xc, y, 1.0, "none") * weights).sum().backward()
    torch.testing.assert_close(x.grad, xc.grad)


def test_psnr_nmse_torch_match_numpy(rng):
    gt, pred = random_volume_pair(rng, (3, 20, 22))
    x, y = torch.from_numpy(gt)[:, None], torch.from_numpy(pred)[:, None]
    psnr_values = metrics.psnr_torch(x, y, gt.max(), reduction="none").numpy()
    nmse_values = metrics.nmse_torch(x, y, reduction="none").numpy()
    for s in range(3):
        assert close(psnr_values[s], peak_signal_noise_ratio(gt[s], pred[s], data_range=gt.max()))
        assert close(nmse_values[s], metrics.nmse(gt[s:s + 1], pred[s:s + 1]))


@pytest.mark.parametrize("sigma", [None, 0.8, 1.5, 12.0])
def test_hfen_torch_and_filter_match_scipy(rng, sigma):
    gt, pred = random_volume_pair(rng, (3, 25, 31), noise=0.2)
    images = torch.from_numpy(gt)[:, None]
    filtered = metrics.laplacian_torch(images, sigma)[:, 0].numpy()
    if sigma is None:
        reference = np.stack([skimage_laplace(g) for g in gt])
        reference[:, [0, -1], :] = 0.0
        reference[:, :, [0, -1]] = 0.0
    else:  # sigma 12 reaches past the image: scipy's reflection repeats, so must ours
        reference = np.stack([ndi.gaussian_laplace(g, sigma) for g in gt])
    np.testing.assert_allclose(filtered, reference, atol=1e-10 * np.abs(reference).max())
    values = metrics.hfen_torch(images, torch.from_numpy(pred)[:, None], sigma, reduction="none")
    np.testing.assert_allclose(values.numpy(), metrics.hfen_per_slice(gt, pred, sigma), rtol=1e-9)


# --- per-volume accumulation ------------------------------------------------------------------

def make_volumes(rng, count=4, shape=(24, 20)):
    return {f"vol{i}": random_volume_pair(rng, (int(rng.integers(2, 6)),) + shape)
            for i in range(count)}


def feed(acc, volumes, slices_by_volume, batch_size=3):
    """Feed (volume, slice) pairs in batches that mix volumes, as a flat sampler would."""
    pairs = [(name, s) for name in volumes for s in slices_by_volume[name]]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        names = [name for name, _ in chunk]
        gt = torch.from_numpy(np.stack([volumes[n][0][s] for n, s in chunk])).float()
        pred = torch.from_numpy(np.stack([volumes[n][1][s] for n, s in chunk])).float()
        acc.update(names, gt, pred, [volumes[n][0].astype(np.float32).max() for n in names])


def assert_matches_volume_functions(results, volumes):
    assert sorted(results) == sorted(volumes)
    for name, (gt, pred) in volumes.items():
        gt32, pred32 = gt.astype(np.float32), pred.astype(np.float32)
        reference = metrics.reconstruction_metrics(gt32, pred32)
        assert results[name]["slices"] == gt.shape[0]
        for key, value in reference.items():
            assert close(results[name][key], value), (name, key, results[name][key], value)


def test_accumulator_split_over_two_merged_matches_whole_volumes(rng):
    volumes = make_volumes(rng)
    names = list(volumes)
    first, second = metrics.VolumeMetricAccumulator(), metrics.VolumeMetricAccumulator()
    # vol0, vol2 on one side, vol1 on the other, vol3's slices split between both
    split = {n: list(range(volumes[n][0].shape[0])) for n in names}
    half = len(split["vol3"]) // 2
    feed(first, {n: volumes[n] for n in ("vol0", "vol2", "vol3")},
         {"vol0": split["vol0"], "vol2": split["vol2"], "vol3": split["vol3"][:half]})
    feed(second, {n: volumes[n] for n in ("vol1", "vol3")},
         {"vol1": split["vol1"], "vol3": split["vol3"][half:]})
    merged = first.merge(second)
    assert_matches_volume_functions(merged.compute(), volumes)
    rebuilt = metrics.VolumeMetricAccumulator.from_state(merged.state())
    assert rebuilt.compute() == merged.compute()
    summary = merged.summary()
    psnrs = [merged.compute()[n]["psnr"] for n in names]
    assert close(summary["psnr"]["mean"], statistics.mean(psnrs))


def _all_reduce_worker(rank, world_size, init_file, volumes, owners, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        mine = {n: v for n, v in volumes.items() if owners[n] == rank}
        acc = metrics.VolumeMetricAccumulator()
        feed(acc, mine, {n: range(v[0].shape[0]) for n, v in mine.items()})
        queue.put((rank, acc.all_reduce().compute()))
    finally:
        dist.destroy_process_group()


def test_accumulator_all_reduce_over_two_gloo_ranks(rng):
    volumes = make_volumes(rng, count=3)
    owners = {"vol0": 0, "vol1": 1, "vol2": 1}
    # spawn, not fork: earlier tests in the same pytest process leave threads (OpenMP, gloo,
    # torch.compile workers) whose locks a forked child can inherit held, and then hangs.
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "rendezvous")
        processes = [context.Process(target=_all_reduce_worker,
                                     args=(rank, 2, init_file, volumes, owners, queue))
                     for rank in range(2)]
        for process in processes:
            process.start()
        results = dict(queue.get(timeout=120) for _ in processes)
        for process in processes:
            process.join(timeout=60)
            assert process.exitcode == 0
    assert results[0] == results[1]
    assert_matches_volume_functions(results[0], volumes)


def test_accumulator_reports_missing_volume_and_inconsistent_range(rng):
    gt, pred = random_volume_pair(rng, (2, 12, 12))
    acc = metrics.VolumeMetricAccumulator(["a", "b"])
    acc.update("a", gt, pred, gt.max())
    with pytest.raises(ValueError, match=r"expected_volumes: 1 volume\(s\) got no slice: \['b'\]"):
        acc.compute()
    with pytest.raises(ValueError, match=r"data_range: volume 'a' got .* pass the same volume"):
        acc.update("a", gt, pred, 2 * gt.max())
    with pytest.raises(ValueError, match=r"volumes: expected one name per slice \(2\), found 3"):
        acc.update(["a", "a", "a"], gt, pred, gt.max())
    with pytest.raises(ValueError, match="HFEN options"):
        acc.merge(metrics.VolumeMetricAccumulator(hfen_sigma=1.5))


# --- errors -----------------------------------------------------------------------------------

def test_bad_inputs_name_argument_and_shapes(rng):
    gt, pred = random_volume_pair(rng, (2, 12, 12))
    with pytest.raises(ValueError, match=r"pred: expected the shape of gt \(2, 12, 12\), "
                                         r"found \(2, 12, 11\)"):
        metrics.psnr(gt, pred[..., :11])
    bad = pred.copy()
    bad[0, 1, 1] = np.nan
    bad[1, 2, 2] = np.inf
    with pytest.raises(ValueError, match="pred: expected finite values, found 1 NaN and 1 Inf"):
        metrics.ssim(gt, bad)
    with pytest.raises(ValueError, match=r"gt: empty volume of shape \(0, 12, 12\)"):
        metrics.nmse(gt[:0], pred[:0])
    with pytest.raises(ValueError, match=r"gt: expected a volume \[S, H, W\], found shape"):
        metrics.ssim(gt[0], pred[0])
    with pytest.raises(ValueError, match="at least 7x7"):
        metrics.ssim(gt[:, :6, :6], pred[:, :6, :6])
    with pytest.raises(ValueError, match=r"y: expected the shape of x \(2, 1, 12, 12\)"):
        metrics.ssim_torch(torch.zeros(2, 1, 12, 12), torch.zeros(2, 1, 12, 13), 1.0)
    with pytest.raises(ValueError, match="data_range: expected a scalar or 2 values"):
        metrics.ssim_torch(torch.zeros(2, 1, 12, 12), torch.zeros(2, 1, 12, 12), [1.0] * 3)
    with pytest.raises(ValueError, match=r"pred: expected finite values, found NaN or Inf"):
        metrics.VolumeMetricAccumulator().update("v", gt, bad, 1.0)
    with pytest.raises(ValueError, match="gt: slice 0 .* has no edges"):
        metrics.hfen(np.ones((1, 8, 8)), pred[:1, :8, :8])


# --- Dice, SNR ---------------------------------------------------------------------------------

def square_labels(shape, label, top, left, size):
    labels = np.zeros(shape, dtype=np.int64)
    labels[top:top + size, left:left + size] = label
    return labels


def test_dice_from_square_overlaps(rng):
    size_a, size_b = int(rng.integers(5, 15)), int(rng.integers(5, 15))
    shift = int(rng.integers(0, 5))
    gt = square_labels((40, 40), 2, 5, 5, size_a)
    pred = square_labels((40, 40), 2, 5 + shift, 5 + shift, size_b)
    overlap_side = max(0, min(5 + size_a, 5 + shift + size_b) - (5 + shift))
    expected = 2.0 * overlap_side ** 2 / (size_a ** 2 + size_b ** 2)
    scores = metrics.dice(pred, gt, num_classes=4)
    assert close(scores[2], expected)
    assert scores[1] == 1.0 and scores[3] == 1.0  # absent from both: the documented default
    assert np.isnan(metrics.dice(pred, gt, 4, when_both_empty=math.nan)[1])
    assert close(metrics.mean_foreground_dice(pred, gt, 4, when_both_empty=math.nan), expected)
    assert close(metrics.mean_foreground_dice(pred, gt, 4), (expected + 2.0) / 3.0)
    # Dice of a volume from per-slice counts summed (as ranks would) equals the volume's Dice
    volume_pred, volume_gt = np.stack([pred, gt, pred]), np.stack([gt, gt, pred])
    counts = [metrics.dice_counts(p, g, 4) for p, g in zip(volume_pred, volume_gt)]
    summed = [sum(c[i] for c in counts) for i in range(3)]
    np.testing.assert_allclose(metrics.dice_from_counts(*summed),
                               metrics.dice(volume_pred, volume_gt, 4))
    with pytest.raises(ValueError, match=r"gt_labels: expected labels in \[0, 1\], found values "
                                         r"from 0 to 2"):
        metrics.dice(pred.clip(0, 1), gt, num_classes=2)


def test_snr_roi_against_explicit_formula(rng):
    labels = np.zeros((2, 32, 32), dtype=np.int64)
    labels[:, 8:16, 8:16] = 1
    labels[:, 18:28, 18:28] = 2
    levels = {1: float(rng.uniform(2, 5)), 2: float(rng.uniform(5, 9))}
    image = rng.normal(0.0, 0.3, labels.shape)
    for label, level in levels.items():
        image[labels == label] += level
    background = image[labels == 0]
    noise = math.sqrt(np.sum((background - background.mean()) ** 2) / (background.size - 1))
    result = metrics.snr_roi(image, labels, tissue_labels=[1, 2], background_label=0)
    for label in levels:
        assert close(result[label], image[labels == label].mean() / noise)
    with pytest.raises(ValueError, match="tissue_labels: label 3 has no pixels"):
        metrics.snr_roi(image, labels, [3], 0)


def test_tissue_roi_labels_margin_and_confidence(rng):
    maps = np.zeros((2, 2, 40, 40))
    maps[0, :, 10:20, 10:30] = rng.uniform(0.5, 1.0, (2, 10, 20))
    maps[1, :, 20:30, 10:30] = rng.uniform(0.5, 1.0, (2, 10, 20))
    margin = int(rng.integers(1, 6))
    labels = metrics.tissue_roi_labels(maps, threshold=0.9, background_margin=margin)
    np.testing.assert_array_equal(labels == 1, maps[0] >= 0.9)
    np.testing.assert_array_equal(labels == 2, maps[1] >= 0.9)
    occupied = (maps >= 0.01).any(axis=0)
    for s in range(2):  # background: city-block distance to any tissue above the margin
        distance = ndi.distance_transform_cdt(~occupied[s], metric="taxicab")
        np.testing.assert_array_equal(labels[s] == 0, distance > margin)


# --- summaries and paired tests ---------------------------------------------------------------

def test_summarize_matches_statistics_module(rng):
    values = list(rng.normal(30.0, 2.0, int(rng.integers(3, 20))))
    summary = metrics.summarize(values, fmt=".3f")
    mean, std = statistics.mean(values), statistics.stdev(values)
    assert close(summary["mean"], mean) and close(summary["std"], std)
    assert summary["mean_pm_std"] == f"{mean:.3f} +- {std:.3f}"
    assert summary["mean_pm_2std"] == f"{mean:.3f} +- {2 * std:.3f}"
    assert summary["n"] == len(values)
    with pytest.raises(ValueError, match="values: expected finite values, found 1 NaN"):
        metrics.summarize([1.0, math.nan])


def test_paired_tests_against_hand_computation(rng):
    n = int(rng.integers(8, 25))
    a = rng.normal(32.0, 1.0, n)
    b = a - rng.normal(0.3, 0.5, n)
    diff = a - b
    t_stat = diff.mean() / (diff.std(ddof=1) / math.sqrt(n))
    result = metrics.paired_test(a, b)
    assert close(result["statistic"], t_stat)
    assert close(result["p_value"], 2 * scipy.stats.t.sf(abs(t_stat), n - 1))
    assert close(result["mean_difference"], diff.mean()) and result["n"] == n
    # the CI excludes 0 exactly when the two-sided p is below 0.05
    low, high = result["ci95"]
    assert close(high - diff.mean(), diff.mean() - low)
    assert close(scipy.stats.t.sf((high - diff.mean()) / (diff.std(ddof=1) / math.sqrt(n)),
                                  n - 1), 0.025)
    assert (low > 0 or high < 0) == (result["p_value"] < 0.05)
    ranks = scipy.stats.rankdata(np.abs(diff))
    w_plus, w_minus = ranks[diff > 0].sum(), ranks[diff < 0].sum()
    wilcoxon = metrics.paired_test(a, b, method="wilcoxon")
    assert wilcoxon["statistic"] == min(w_plus, w_minus)
    assert 0.0 < wilcoxon["p_value"] <= 1.0
    with pytest.raises(ValueError, match=r"b: expected as many values as a \(%d\)" % n):
        metrics.paired_test(a, b[:-1])


def test_slice_sums_reduced_by_key_suffix_give_volume_metrics(rng):
    """kdhpc.train's protocol: per-slice values summed per volume, keys ending in _max maxed."""
    gt, pred = random_volume_pair(rng, (5, 16, 18))
    halves = [metrics.reconstruction_slice_sums(gt[part], pred[part], gt.max())
              for part in (slice(0, 2), slice(2, 5))]
    sums = {key: (max if key.endswith("_max") else sum)(float(v) for h in halves for v in h[key])
            for key in halves[0]}
    result = metrics.volume_metrics_from_sums(sums)
    for key, value in metrics.reconstruction_metrics(gt, pred).items():
        assert close(result[key], value), key
    del sums["gt_sq"]
    with pytest.raises(ValueError, match=r"sums of volume: missing keys \['gt_sq'\]"):
        metrics.volume_metrics_from_sums(sums)

"""Python equivalents of the Gadgetron gadgets that turn acquisitions into ``ReconData`` buffers.

The offline readers and the emulator use the same steps as a Gadgetron chain
``NoiseAdjust → RemoveROOversampling → AcquisitionAccumulateTrigger → BucketToBuffer``:

- :func:`drop_discarded_samples`: the ``discard_pre``/``discard_post`` samples of every acquisition are
  dropped before anything else (as mrpro does; Gadgetron's BucketToBuffer never copies them). Every step
  below drops them from its input too, so a chain that starts at any of them never sees them.
- :func:`noise_adjust`: noise scans (``ACQ_IS_NOISE_MEASUREMENT``) give the coil noise covariance;
  every later acquisition is prewhitened with the inverse Cholesky factor, scaled per acquisition by
  the dwell-time / receiver-bandwidth factor of Gadgetron's NoiseAdjustGadget (1 when either dwell
  time is 0). Noise scans are dropped.
- :func:`asymmetric_echo_adjust`: partial-echo readouts are zero-padded in front to the encoded readout
  length, their centre sample at its middle (AsymmetricEchoAdjustROGadget).
- :func:`remove_ro_oversampling`: when the encoded readout FOV exceeds the recon FOV, FFT along the
  readout, keep the centre, inverse FFT (RemoveROOversamplingGadget).
- :func:`accumulate_trigger`: collect acquisitions into buckets until a trigger dimension changes
  (AcquisitionAccumulateTriggerGadget); calibration lines go to ``bucket.ref``.
- :func:`bucket_to_buffer`: place the lines of a bucket into ``gadgetron.types.ReconData`` with the
  wire layout (data ``[E0, E1, E2, CHA, N, S, LOC]``, headers ``[E1, E2, N, S, LOC]``, a
  ``SamplingDescription``), ``ref`` holding the PARALLEL_CALIBRATION(_AND_IMAGING) lines and ``data``
  everything but pure calibration lines (BucketToBufferGadget).

:func:`recon_data_from_acquisitions` runs the whole chain; each step also exists for one acquisition at a time
(:class:`NoiseAdjuster`, :func:`adjust_asymmetric_echo`, :func:`remove_oversampling`,
:class:`TriggerAccumulator`), which :class:`~semrecon_core.data.readers.ScanAssembler` strings together for
files and for the MRD server's streams alike.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np

FLAG_NOISE = 19
FLAG_PARALLEL_CALIBRATION = 20
FLAG_PARALLEL_CALIBRATION_AND_IMAGING = 21
# navigation, phase correction, HP/RT feedback, dummy scans, surface-coil correction, phase stabilisation
_SKIPPED_FLAGS = (23, 24, 26, 27, 28, 29, 30, 31)
DEFAULT_RECEIVER_NOISE_BANDWIDTH = 0.793
_DIMENSIONS = ("average", "slice", "contrast", "phase", "repetition", "set", "segment")


def _gadgetron_types() -> Any:
    from gadgetron.types import recon_data

    return recon_data


def parse_header(header: Any) -> Any:
    """An ``ismrmrd.xsd.ismrmrdHeader`` from XML text/bytes (an already parsed header passes through)."""
    import ismrmrd

    if isinstance(header, bytes):
        header = header.decode("utf-8")
    if isinstance(header, str):
        try:
            return ismrmrd.xsd.CreateFromDocument(header)
        except Exception as exc:  # noqa: BLE001 (pyxb raises many exception types for bad XML)
            raise ValueError(f"ISMRMRD XML header does not parse: {exc}") from None
    return header


def _encoding(header: Any) -> Any:
    if not header.encoding:
        raise ValueError("ISMRMRD header: no <encoding> element")
    return header.encoding[0]


# Largest matrix side an ISMRMRD header may claim (encoded or recon space, any axis): far beyond any 2-D
# Cartesian scan, far below what would exhaust memory when a buffer of that size is allocated.
MAX_MATRIX_SIDE = 16384


def check_header(header: Any, *, channels: int | None = None) -> Any:
    """Validate the ISMRMRD header against what semrecon needs and what the data hold; returns it parsed.

    The one place headers are checked, by every path that builds buffers or a ``KSpace`` from them: an
    ``<encoding>`` is present, its encoded and recon matrix sizes lie in 1 … :data:`MAX_MATRIX_SIDE`
    (checked before anything of that size is allocated), and ``receiverChannels``, when the header gives it,
    equals the ``channels`` the acquisitions carry. Errors name the header field, the expected and the
    found value.
    """
    parsed = parse_header(header)
    encoding = _encoding(parsed)
    for space in ("encodedSpace", "reconSpace"):
        size = getattr(getattr(encoding, space, None), "matrixSize", None)
        if size is None:
            raise ValueError(f"ISMRMRD header: <encoding><{space}><matrixSize> is missing")
        for axis in ("x", "y", "z"):
            value = getattr(size, axis, None)
            value = 1 if value is None and axis == "z" else value
            if value is None or not 1 <= int(value) <= MAX_MATRIX_SIDE:
                raise ValueError(
                    f"ISMRMRD header: <encoding><{space}><matrixSize><{axis}> is {value}; "
                    f"expected 1 to {MAX_MATRIX_SIDE}"
                )
    system = getattr(parsed, "acquisitionSystemInformation", None)
    declared = getattr(system, "receiverChannels", None) if system is not None else None
    if channels is not None and declared is not None and int(declared) != int(channels):
        raise ValueError(
            f"ISMRMRD header: <acquisitionSystemInformation><receiverChannels> is {int(declared)}, "
            f"but the acquisitions carry {int(channels)} channels"
        )
    return parsed


def _is(acq: Any, flag: int) -> bool:
    return bool(acq.flags & (1 << (flag - 1)))


def _describe(acq: Any, number: int | None = None) -> str:
    where = f"acquisition #{number}" if number is not None else f"acquisition (scan counter {acq.scan_counter})"
    idx = acq.idx
    return f"{where} (line {idx.kspace_encode_step_1}, slice {idx.slice}, repetition {idx.repetition})"


def _with_data(acq: Any, data: np.ndarray, **changes: int) -> Any:
    """A new acquisition with ``acq``'s header (plus ``changes``) and ``data`` (channels, samples)."""
    import ismrmrd

    head = copy.deepcopy(acq.getHead())
    head.number_of_samples = data.shape[1]
    head.active_channels = data.shape[0]
    for name, value in changes.items():
        setattr(head, name, value)
    traj = acq.traj
    if traj.size and traj.shape[0] != data.shape[1]:
        head.trajectory_dimensions = 0
        traj = None
    return ismrmrd.Acquisition(head, np.ascontiguousarray(data, dtype=np.complex64), traj)


# ------------------------------------------------------------------------------------ discard samples
def _without_discarded(acq: Any) -> Any:
    """``acq`` without its ``discard_pre``/``discard_post`` samples (``acq`` itself when it has none).

    ``center_sample`` then counts from the first kept sample. A file may count it either way: a symmetric
    readout (centre = half the acquired samples) or a centre beyond the kept samples counts from the first
    acquired sample and is shifted by ``discard_pre`` (Gadgetron places such lines at their acquired
    position); otherwise it already counts from the first kept sample, as in mrpro's files and for
    Gadgetron's asymmetric readouts.
    """
    import ismrmrd

    pre, post = int(acq.discard_pre), int(acq.discard_post)
    if not pre and not post:
        return acq
    samples = int(acq.number_of_samples)
    kept = samples - pre - post
    if kept <= 0:
        raise ValueError(
            f"{_describe(acq)}: discard_pre {pre} + discard_post {post} leave none of its {samples} samples"
        )
    head = copy.deepcopy(acq.getHead())
    centre = int(acq.center_sample)
    if centre == samples // 2 or centre >= kept:
        centre -= pre
    head.center_sample = min(max(centre, 0), kept - 1)
    head.number_of_samples = kept
    head.discard_pre = head.discard_post = 0
    data = np.ascontiguousarray(np.asarray(acq.data)[:, pre : pre + kept], dtype=np.complex64)
    traj = np.ascontiguousarray(acq.traj[pre : pre + kept]) if acq.traj.size else None
    if traj is None:
        head.trajectory_dimensions = 0
    return ismrmrd.Acquisition(head, data, traj)


class ReadoutLengths:
    """Refuses acquisitions whose readouts keep different numbers of samples, counted as the file stores them.

    Noise scans and the lines Gadgetron skips (navigators, phase correction, ...) may differ. Every imaging
    line must keep the same number of samples once its ``discard_pre``/``discard_post`` are dropped, and so must
    every separate calibration line (PARALLEL_CALIBRATION); the two groups may differ where neither is longer
    than the encoded readout ``full`` (a partial echo, which :func:`adjust_asymmetric_echo` zero-pads): full-echo
    calibration lines go with partial-echo imaging lines. Checked before readout oversampling is removed, so the
    message quotes the file's own numbers. Call :meth:`check` with each header in stream order.
    """

    def __init__(self, source: str, full: int = 0) -> None:
        self.source = source
        self.full = full
        # per group (imaging, calibration): (acquisition number, kept samples, stored samples) of its first line
        self.first: dict[bool, tuple[int, int, int]] = {}

    def check(self, number: int, head: Any) -> None:
        """Check acquisition ``number``'s header ``head``; raises ``ValueError`` naming both acquisitions."""
        flags = int(head.flags)
        if flags & (1 << (FLAG_NOISE - 1)) or any(flags & (1 << (flag - 1)) for flag in _SKIPPED_FLAGS):
            return
        stored = int(head.number_of_samples)
        kept = stored - int(head.discard_pre) - int(head.discard_post)
        calibration = bool(flags & (1 << (FLAG_PARALLEL_CALIBRATION - 1)))
        first = self.first.setdefault(calibration, (number, kept, stored))
        other = self.first.get(not calibration)
        if kept != first[1]:
            self._refuse(number, head, kept, stored, first)
        if other is not None and kept != other[1] and max(kept, other[1]) > self.full:
            self._refuse(number, head, kept, stored, other)

    def _refuse(self, number: int, head: Any, kept: int, stored: int, first: tuple[int, int, int]) -> None:
        idx = head.idx
        raise ValueError(
            f"{self.source}: inconsistent readout lengths: acquisition #{number} (line "
            f"{idx.kspace_encode_step_1}, slice {idx.slice}, repetition {idx.repetition}) "
            f"{_samples(kept, stored)}, acquisition #{first[0]} {_samples(first[1], first[2])}"
        )


def check_readout_lengths(heads: Iterable[Any], source: str, full: int = 0) -> None:
    """:class:`ReadoutLengths` over ``heads`` (acquisition headers in file order)."""
    lengths = ReadoutLengths(source, full)
    for number, head in enumerate(heads):
        lengths.check(number, head)


def _samples(kept: int, stored: int) -> str:
    return f"has {stored} samples" if kept == stored else f"keeps {kept} of its {stored} samples after discards"


def drop_discarded_samples(acquisitions: Iterable[Any]) -> Iterator[Any]:
    """Drop the ``discard_pre``/``discard_post`` samples of every acquisition (noise scans included).

    The first step of every chain, as in mrpro; acquisitions without discard samples pass unchanged.
    Inputs are never modified.
    """
    for acq in acquisitions:
        yield _without_discarded(acq)


# --------------------------------------------------------------------------------------------- noise
def noise_bandwidth_scale(
    acquisition_dwell_time_us: float,
    noise_dwell_time_us: float,
    receiver_noise_bandwidth: float = DEFAULT_RECEIVER_NOISE_BANDWIDTH,
) -> float:
    """Gadgetron's NoiseAdjustGadget scale ``sqrt(2 · dwell_data / dwell_noise · receiver_noise_bandwidth)``.

    1.0 when either dwell time (``sample_time_us``) is 0, as Gadgetron does (files written without dwell
    times, e.g. mrpro's, have 0).
    """
    if acquisition_dwell_time_us == 0 or noise_dwell_time_us == 0:
        return 1.0
    return float(np.sqrt(2.0 * acquisition_dwell_time_us / noise_dwell_time_us * receiver_noise_bandwidth))


def noise_dwell_time_us(noise: Sequence[Any]) -> float:
    """The noise scan's dwell time: the first non-zero ``sample_time_us`` of its acquisitions (else 0)."""
    for acq in noise:
        dwell = _dwell_time_us(acq)
        if dwell:
            return dwell
    return 0.0


def _dwell_time_us(acq: Any) -> float:
    dwell = float(acq.sample_time_us)
    if not np.isfinite(dwell) or dwell < 0:
        raise ValueError(f"{_describe(acq)}: sample_time_us {dwell} is not a dwell time (expected >= 0)")
    return dwell


def _inverse_noise_factor(noise: Sequence[Any]) -> np.ndarray:
    """``L⁻¹`` with ``L Lᴴ`` the sample noise covariance of the noise acquisitions."""
    if not noise:
        raise ValueError("noise prewhitening: no noise acquisitions")
    channels = noise[0].active_channels
    for acq in noise:
        if acq.active_channels != channels:
            raise ValueError(
                f"noise scan: inconsistent channel counts ({acq.active_channels} vs {channels}) in {_describe(acq)}"
            )
    samples = np.concatenate([np.asarray(acq.data, dtype=np.complex128) for acq in noise], axis=1)
    if not np.isfinite(samples).all():
        raise ValueError("noise scan: contains NaN or Inf samples")
    covariance = samples @ samples.conj().T / max(samples.shape[1] - 1, 1)
    try:
        lower = np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError:
        raise ValueError(
            f"noise scan: the {channels}×{channels} noise covariance is not positive definite "
            "(a dead or duplicated channel?)"
        ) from None
    return np.linalg.inv(lower)


def noise_prewhitener(
    noise: Sequence[Any],
    *,
    acquisition_dwell_time_us: float,
    receiver_noise_bandwidth: float = DEFAULT_RECEIVER_NOISE_BANDWIDTH,
) -> np.ndarray:
    """The ``(coils, coils)`` prewhitening matrix ``W`` for acquisitions of the given dwell time.

    ``W = s · L⁻¹`` with ``L Lᴴ`` the sample noise covariance and ``s`` =
    :func:`noise_bandwidth_scale` of the acquisition's and the noise scan's dwell times (Gadgetron's
    NoiseAdjustGadget), so whitened data have uncorrelated coils of equal noise level.
    """
    noise = [_without_discarded(acq) for acq in noise]
    scale = noise_bandwidth_scale(acquisition_dwell_time_us, noise_dwell_time_us(noise), receiver_noise_bandwidth)
    return (scale * _inverse_noise_factor(noise)).astype(np.complex64)


class NoiseAdjuster:
    """NoiseAdjustGadget one acquisition at a time: :meth:`push` returns the prewhitened acquisition or ``None``.

    Noise scans (``ACQ_IS_NOISE_MEASUREMENT``) are collected and consumed (``None``); every later acquisition
    is prewhitened with their covariance, scaled by its own dwell time (:func:`noise_bandwidth_scale`, with the
    header's ``relativeReceiverNoiseBandwidth``). Without noise scans acquisitions pass unchanged. Discard
    samples are dropped first. Inputs are never modified.
    """

    def __init__(self, header: Any) -> None:
        header = parse_header(header)
        system = header.acquisitionSystemInformation
        bandwidth = getattr(system, "relativeReceiverNoiseBandwidth", None) if system is not None else None
        self.bandwidth = float(bandwidth) if bandwidth else DEFAULT_RECEIVER_NOISE_BANDWIDTH
        self.noise: list[Any] = []
        self.inverse: np.ndarray | None = None
        self.noise_dwell = 0.0
        self.whiteners: dict[float, np.ndarray] = {}

    @property
    def noise_scans(self) -> int:
        """Noise acquisitions consumed so far."""
        return len(self.noise)

    def push(self, acq: Any) -> Any | None:
        """The prewhitened ``acq``; ``None`` for a noise scan (kept for the covariance)."""
        acq = _without_discarded(acq)
        if _is(acq, FLAG_NOISE):
            if self.inverse is not None:
                raise ValueError(f"noise scan after imaging data ({_describe(acq)}); expected noise scans first")
            self.noise.append(acq)
            return None
        if self.noise and self.inverse is None:
            self.inverse = _inverse_noise_factor(self.noise)
            self.noise_dwell = noise_dwell_time_us(self.noise)
        if self.inverse is None:
            return acq
        if acq.active_channels != self.inverse.shape[0]:
            raise ValueError(
                f"inconsistent channel counts: {_describe(acq)} has {acq.active_channels} channels, "
                f"the noise scan {self.inverse.shape[0]}"
            )
        dwell = _dwell_time_us(acq)
        whitener = self.whiteners.get(dwell)
        if whitener is None:
            scale = noise_bandwidth_scale(dwell, self.noise_dwell, self.bandwidth)
            whitener = self.whiteners[dwell] = (scale * self.inverse).astype(np.complex64)
        # einsum, not BLAS: tiny per-line products are far slower through a multithreaded BLAS
        return _with_data(acq, np.einsum("ij,jk->ik", whitener, acq.data))


def noise_adjust(acquisitions: Iterable[Any], header: Any) -> Iterator[Any]:
    """NoiseAdjustGadget: drop noise scans and prewhiten every following acquisition with them.

    The scale of each acquisition comes from its own dwell time (:func:`noise_bandwidth_scale`).
    Discard samples are dropped first. Without noise scans the acquisitions pass through unchanged.
    Inputs are never modified (:class:`NoiseAdjuster`).
    """
    adjuster = NoiseAdjuster(header)
    for acq in acquisitions:
        adjusted = adjuster.push(acq)
        if adjusted is not None:
            yield adjusted


# ----------------------------------------------------------------------------------- asymmetric echo
def full_readout(header: Any) -> int:
    """The encoded readout length (``encodedSpace/matrixSize/x``, oversampled samples included)."""
    return int(_encoding(parse_header(header)).encodedSpace.matrixSize.x)


def adjust_asymmetric_echo(acq: Any, full: int) -> Any:
    """AsymmetricEchoAdjustROGadget for one acquisition: a partial echo zero-padded to the ``full`` readout.

    A readout shorter than ``full`` samples is placed so that its ``center_sample`` lands on ``full // 2``
    (the missing early samples of a partial echo become zeros in front) and ``center_sample`` becomes
    ``full // 2``; noise scans and full readouts pass unchanged. Inputs are never modified.
    """
    samples = int(acq.number_of_samples)
    if samples >= full or _is(acq, FLAG_NOISE):
        return acq
    start = min(max(full // 2 - int(acq.center_sample), 0), full - samples)
    padded = np.zeros((int(acq.active_channels), full), dtype=np.complex64)
    padded[:, start : start + samples] = np.asarray(acq.data)
    return _with_data(acq, padded, center_sample=full // 2)


def asymmetric_echo_adjust(acquisitions: Iterable[Any], header: Any) -> Iterator[Any]:
    """AsymmetricEchoAdjustROGadget: zero-pad partial-echo readouts to the encoded readout length.

    Discard samples are dropped first (:func:`adjust_asymmetric_echo` for each acquisition).
    """
    full = full_readout(header)
    for acq in drop_discarded_samples(acquisitions):
        yield adjust_asymmetric_echo(acq, full)


# ---------------------------------------------------------------------------- readout oversampling
def readout_oversampling(header: Any) -> float:
    """Encoded / recon readout FOV ratio (> 1 when the readout is oversampled), as Gadgetron decides it.

    The field of view decides, not the matrix sizes: a recon matrix as large as the encoded one (a scanner's
    interpolation) does not make an oversampled readout any less oversampled.
    """
    encoding = _encoding(parse_header(header))
    encoded = float(encoding.encodedSpace.fieldOfView_mm.x)
    recon = float(encoding.reconSpace.fieldOfView_mm.x)
    if recon <= 0 or encoded <= recon * 1.01:
        return 1.0
    return encoded / recon


def crop_readout(data: np.ndarray, keep: int) -> np.ndarray:
    """Keep the central ``keep`` pixels of the readout FOV of ``(..., samples)`` k-space.

    Centred orthonormal iFFT along the readout, centre crop, FFT back (as RemoveROOversamplingGadget),
    so the noise level per sample is unchanged.
    """
    samples = data.shape[-1]
    if keep >= samples:
        return data
    image = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(data, axes=-1), axis=-1, norm="ortho"), axes=-1)
    start = samples // 2 - keep // 2
    cropped = image[..., start : start + keep]
    out = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(cropped, axes=-1), axis=-1, norm="ortho"), axes=-1)
    return out.astype(np.complex64)


def remove_ro_oversampling(acquisitions: Iterable[Any], header: Any) -> Iterator[Any]:
    """RemoveROOversamplingGadget: crop the oversampled readout FOV to the recon FOV.

    Discard samples are dropped first; ``center_sample`` is scaled with the readout length.
    """
    ratio = readout_oversampling(header)
    for acq in drop_discarded_samples(acquisitions):
        yield remove_oversampling(acq, ratio)


def remove_oversampling(acq: Any, ratio: float) -> Any:
    """RemoveROOversamplingGadget for one acquisition: the central ``1 / ratio`` of its readout FOV."""
    if ratio == 1.0 or _is(acq, FLAG_NOISE):
        return acq
    samples = acq.number_of_samples
    keep = int(round(samples / ratio))
    return _with_data(
        acq,
        crop_readout(np.asarray(acq.data), keep),
        center_sample=int(round(acq.center_sample * keep / samples)),
    )


# ----------------------------------------------------------------------------------- accumulation
@dataclass
class Bucket:
    """Acquisitions collected between two triggers: imaging lines and calibration lines."""

    data: list[Any] = field(default_factory=list)
    ref: list[Any] = field(default_factory=list)


# ISMRMRD flag numbers of ACQ_LAST_IN_<dimension> and of ACQ_LAST_IN_MEASUREMENT
_LAST_IN = {"average": 6, "slice": 8, "contrast": 10, "phase": 12, "repetition": 14, "set": 16, "segment": 18}
FLAG_LAST_IN_MEASUREMENT = 25


class TriggerAccumulator:
    """AcquisitionAccumulateTriggerGadget one acquisition at a time: :meth:`push` returns the finished buckets.

    A bucket ends when the ``trigger`` counter (``repetition``, ``slice``, ...; ``none``: only at the end)
    changes, as in Gadgetron, and, with ``on_flags``, as soon as its last acquisition is in: an imaging line
    flagged ``ACQ_LAST_IN_<trigger>`` or ``ACQ_LAST_IN_MEASUREMENT``, or (trigger ``repetition``, one contrast
    and one average in the header's encoding limits) once every slice of the encoding limits has had its line
    flagged ``ACQ_LAST_IN_SLICE``. :meth:`flush` returns what is left at the end of the stream.
    PARALLEL_CALIBRATION lines go to ``ref``; CALIBRATION_AND_IMAGING lines to both; navigator,
    phase-correction, feedback and dummy lines and noise scans are dropped.
    """

    def __init__(self, trigger: str = "repetition", *, header: Any = None, on_flags: bool = False) -> None:
        if trigger != "none" and trigger not in _DIMENSIONS:
            raise ValueError(f"trigger dimension: expected none or one of {', '.join(_DIMENSIONS)}, found {trigger!r}")
        self.trigger = trigger
        self.on_flags = on_flags
        self.bucket = Bucket()
        self.current: int | None = None
        self.slices_done: set[int] = set()
        self.slices = 0  # slices the volume needs for the all-slices rule; 0: that rule is off
        if on_flags and trigger == "repetition" and header is not None:
            limits = _encoding(parse_header(header)).encodingLimits
            single = all(_limit(limits, name, (0, 0, 0))[2] == 0 for name in ("contrast", "average"))
            self.slices = _limit(limits, "slice", (0, 0, 0))[2] + 1 if single else 0

    def push(self, acq: Any) -> list[Bucket]:
        """Add ``acq``; the buckets it finishes (none, one, or two when a counter change meets a last flag)."""
        done: list[Bucket] = []
        if _is(acq, FLAG_NOISE) or any(_is(acq, flag) for flag in _SKIPPED_FLAGS):
            return done
        if self.trigger != "none":
            value = getattr(acq.idx, self.trigger)
            if self.current is not None and value != self.current and (self.bucket.data or self.bucket.ref):
                done.append(self._take())
            self.current = value
        if _is(acq, FLAG_PARALLEL_CALIBRATION):
            self.bucket.ref.append(acq)
            return done
        if _is(acq, FLAG_PARALLEL_CALIBRATION_AND_IMAGING):
            self.bucket.ref.append(acq)
        self.bucket.data.append(acq)
        if self.on_flags and self._last(acq):
            done.append(self._take())
        return done

    def flush(self) -> list[Bucket]:
        """The bucket still open at the end of the stream (if it holds anything)."""
        return [self._take()] if self.bucket.data or self.bucket.ref else []

    def _last(self, acq: Any) -> bool:
        if _is(acq, FLAG_LAST_IN_MEASUREMENT) or (self.trigger in _LAST_IN and _is(acq, _LAST_IN[self.trigger])):
            return True
        if self.slices and _is(acq, _LAST_IN["slice"]):
            self.slices_done.add(int(acq.idx.slice))
            return self.slices_done >= set(range(self.slices))
        return False

    def _take(self) -> Bucket:
        bucket, self.bucket = self.bucket, Bucket()
        self.slices_done = set()
        return bucket


def accumulate_trigger(acquisitions: Iterable[Any], trigger: str = "repetition") -> Iterator[Bucket]:
    """AcquisitionAccumulateTriggerGadget: emit a bucket whenever the ``trigger`` index changes.

    ``trigger`` is an encoding counter name (``repetition``, ``slice``, ...) or ``none`` (one bucket at
    the end). PARALLEL_CALIBRATION lines go to ``ref``; CALIBRATION_AND_IMAGING lines to both;
    navigator, phase-correction, feedback and dummy lines are dropped (:class:`TriggerAccumulator`).
    """
    accumulator = TriggerAccumulator(trigger)
    for acq in acquisitions:
        yield from accumulator.push(acq)
    yield from accumulator.flush()


# ------------------------------------------------------------------------------------- buffering
class _BufferOptions(TypedDict):
    """How acquisitions are grouped into buffers (the BucketToBuffer options shared by every step)."""

    n_dimension: str
    s_dimension: str
    split_slices: bool


def _key(acq: Any, n_dimension: str, s_dimension: str, split_slices: bool) -> tuple[int, ...]:
    values = {name: getattr(acq.idx, name) for name in _DIMENSIONS}
    for name in (n_dimension, s_dimension):
        if name:
            values[name] = 0
    if not split_slices:
        values["slice"] = 0
    return tuple(values[name] for name in _DIMENSIONS)


def _limit(limits: Any, name: str, default: tuple[int, int, int]) -> tuple[int, int, int]:
    limit = getattr(limits, name, None) if limits is not None else None
    if limit is None:
        return default
    return int(limit.minimum), int(limit.center), int(limit.maximum)


def _make_buffer(
    acqs: Sequence[Any],
    header: Any,
    *,
    n_dimension: str,
    s_dimension: str,
    split_slices: bool,
    what: str,
) -> Any:
    """Place ``acqs`` (one key) into a ``ReconBuffer`` with the full encoded E1/E2 grid."""
    import ismrmrd

    types = _gadgetron_types()
    encoding = _encoding(header)
    encoded = encoding.encodedSpace
    recon = encoding.reconSpace
    limits = encoding.encodingLimits

    first = acqs[0]
    samples, channels = first.number_of_samples, first.active_channels
    for acq in acqs:
        if acq.encoding_space_ref != 0:
            raise ValueError(
                f"{_describe(acq)} belongs to encoding space {acq.encoding_space_ref}; "
                "only the first <encoding> of the header is supported"
            )
        if acq.active_channels != channels:
            raise ValueError(
                f"inconsistent channel counts: {_describe(acq)} has {acq.active_channels} channels, "
                f"expected {channels} like the first {what} line"
            )
        if acq.number_of_samples != samples:
            raise ValueError(
                f"inconsistent readout lengths: {_describe(acq)} has {acq.number_of_samples} samples, "
                f"expected {samples}"
            )
    ratio = readout_oversampling(header)
    e0 = max(int(round(encoded.matrixSize.x / ratio)), samples)
    e1 = int(encoded.matrixSize.y)
    e2 = max(int(encoded.matrixSize.z), 1)
    _, e1_center, _ = _limit(limits, "kspace_encoding_step_1", (0, e1 // 2, e1 - 1))
    e2_min, e2_center, _ = _limit(limits, "kspace_encoding_step_2", (0, e2 // 2, e2 - 1))
    e1_offset = e1 // 2 - e1_center
    e2_offset = e2 // 2 - e2_center if e2 > 1 else -e2_min

    def index(acq: Any, name: str) -> int:
        return getattr(acq.idx, name) if name else 0

    n_size = max(index(a, n_dimension) for a in acqs) + 1
    s_size = max(index(a, s_dimension) for a in acqs) + 1
    loc_size = 1 if split_slices else max(a.idx.slice for a in acqs) + 1
    data = np.zeros((e0, e1, e2, channels, n_size, s_size, loc_size), dtype=np.complex64)
    headers = np.empty((e1, e2, n_size, s_size, loc_size), dtype=object)
    for position in np.ndindex(headers.shape):
        headers[position] = ismrmrd.AcquisitionHeader()

    for acq in acqs:
        line = acq.idx.kspace_encode_step_1 + e1_offset
        partition = acq.idx.kspace_encode_step_2 + e2_offset
        if not (0 <= line < e1 and 0 <= partition < e2):
            raise ValueError(
                f"{_describe(acq)} lies outside the encoded matrix {e1}×{e2} (encoding limits centre {e1_center})"
            )
        start = e0 // 2 - acq.center_sample if samples < e0 else 0
        start = min(max(start, 0), e0 - samples)
        n, s = index(acq, n_dimension), index(acq, s_dimension)
        loc = 0 if split_slices else acq.idx.slice
        data[start : start + samples, line, partition, :, n, s, loc] = np.asarray(acq.data).T
        headers[line, partition, n, s, loc] = acq.getHead()

    lines = [a.idx.kspace_encode_step_1 + e1_offset for a in acqs]
    partitions = [a.idx.kspace_encode_step_2 + e2_offset for a in acqs]
    sampling = types.SamplingDescription()
    sampling.encoded_FOV[:] = (
        float(recon.fieldOfView_mm.x) if ratio > 1 else float(encoded.fieldOfView_mm.x),
        float(encoded.fieldOfView_mm.y),
        float(encoded.fieldOfView_mm.z),
    )
    sampling.recon_FOV[:] = (
        float(recon.fieldOfView_mm.x),
        float(recon.fieldOfView_mm.y),
        float(recon.fieldOfView_mm.z),
    )
    sampling.encoded_matrix[:] = (e0, e1, e2)
    sampling.recon_matrix[:] = (
        int(recon.matrixSize.x),
        int(recon.matrixSize.y),
        max(int(recon.matrixSize.z), 1),
    )
    center_sample = min(first.center_sample, e0 - 1) if samples == e0 else e0 // 2
    for axis, (low, centre, high) in enumerate(
        (
            (0, center_sample, e0 - 1),
            (min(lines), e1_center + e1_offset, max(lines)),
            (min(partitions), e2_center + e2_offset if e2 > 1 else 0, max(partitions)),
        )
    ):
        sampling.sampling_limits[axis].min = low
        sampling.sampling_limits[axis].center = centre
        sampling.sampling_limits[axis].max = high
    return types.ReconBuffer(data, None, None, headers, sampling)


def bucket_to_buffer(
    bucket: Bucket,
    header: Any,
    *,
    n_dimension: str = "",
    s_dimension: str = "",
    split_slices: bool = True,
) -> Any:
    """BucketToBufferGadget: one ``ReconBit`` per acquisition key, in key order.

    The key is (average, slice, contrast, phase, repetition, set, segment), minus the dimensions mapped to N
    and S, and minus slice unless ``split_slices``.

    Returns a ``gadgetron.types.ReconData``; ``bit.ref`` is ``None`` when the key has no calibration lines.
    """
    types = _gadgetron_types()
    first = next(iter(bucket.data), None)
    header = check_header(header, channels=None if first is None else int(first.active_channels))
    for name in (n_dimension, s_dimension):
        if name and name not in _DIMENSIONS:
            raise ValueError(f"buffer dimension: expected one of {', '.join(_DIMENSIONS)}, found {name!r}")
    options: _BufferOptions = {"n_dimension": n_dimension, "s_dimension": s_dimension, "split_slices": split_slices}
    data_groups: dict[tuple[int, ...], list[Any]] = {}
    ref_groups: dict[tuple[int, ...], list[Any]] = {}
    for acq in drop_discarded_samples(bucket.data):
        data_groups.setdefault(_key(acq, **options), []).append(acq)
    for acq in drop_discarded_samples(bucket.ref):
        ref_groups.setdefault(_key(acq, **options), []).append(acq)
    bits = []
    # in key order (average, slice, contrast, ...), as Gadgetron's std::map of buffers: interleaved slices
    # acquired 0, 2, 1 leave in slice order
    for key, acqs in sorted(data_groups.items()):
        ref = ref_groups.get(key)
        if ref is None and ref_groups and not split_slices:
            ref = next(iter(ref_groups.values()))
        bits.append(
            types.ReconBit(
                _make_buffer(acqs, header, what="imaging", **options),
                None if ref is None else _make_buffer(ref, header, what="calibration", **options),
            )
        )
    return types.ReconData(bits)


def recon_data_from_acquisitions(
    acquisitions: Iterable[Any],
    header: Any,
    *,
    trigger: str = "repetition",
    n_dimension: str = "",
    s_dimension: str = "",
    split_slices: bool = True,
) -> list[Any]:
    """The whole chain NoiseAdjust → AsymmetricEchoAdjustRO → RemoveROOversampling → AccumulateTrigger → BucketToBuffer.

    Discard samples are dropped first. Returns one ``ReconData`` per trigger.
    """
    header = check_header(header)
    adjusted = asymmetric_echo_adjust(noise_adjust(drop_discarded_samples(acquisitions), header), header)
    stream = remove_ro_oversampling(adjusted, header)
    return [
        bucket_to_buffer(bucket, header, n_dimension=n_dimension, s_dimension=s_dimension, split_slices=split_slices)
        for bucket in accumulate_trigger(stream, trigger)
        if bucket.data
    ]

"""The MFCCs SyncNet was trained on: python_speech_features.mfcc defaults on 16 kHz int16-scaled audio.

Written out here (30 lines of numpy/scipy) rather than taken from a library: python_speech_features itself is
unmaintained (last release 2017, source-only, on scipy's legacy fftpack), torchaudio does not install beside
torch 2.13 (STACK.md), and librosa's MFCC is a different recipe (Slaney mel scale, no log-energy in c0, no
pre-emphasis), which SyncNet's weights would read as other input. Every step below is python_speech_features
0.6's, with its defaults: pre-emphasis 0.97, 25 ms frames every 10 ms (zero-padded at the end), 512-point power
spectrum / 512, 26 triangular mel filters on its integer FFT-bin grid, log, orthonormal DCT-II, 13 coefficients,
sinusoidal lifter 22, c0 replaced by the log frame energy. syncnet_python reads the wav as int16, so samples
are scaled by 32768 first (this moves c0 by a constant, which the network sees).
"""
from __future__ import annotations

import math

import numpy as np
import scipy.fft

SAMPLE_RATE = 16_000
WIN_SAMPLES = 400  # 25 ms
HOP_SAMPLES = 160  # 10 ms
NFFT = 512
NUM_FILTERS = 26
NUM_CEPS = 13
PREEMPHASIS = 0.97
CEP_LIFTER = 22
INT16_SCALE = 32768.0


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """[26, 257] triangular filters on python_speech_features' bin grid floor((nfft + 1) * hz / rate)."""
    mels = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), NUM_FILTERS + 2)
    bins = np.floor((NFFT + 1) * _mel_to_hz(mels) / sample_rate)
    bank = np.zeros((NUM_FILTERS, NFFT // 2 + 1))
    for j in range(NUM_FILTERS):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        rise = np.arange(int(lo), int(mid))
        fall = np.arange(int(mid), int(hi))
        bank[j, rise] = (rise - lo) / (mid - lo)
        bank[j, fall] = (hi - fall) / (hi - mid)
    return bank


def syncnet_mfcc(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float audio in [-1, 1] at 16 kHz -> [13, N] MFCCs, N = 1 + ceil((len - 400) / 160) (4 per video frame)."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"SyncNet's MFCCs are defined at {SAMPLE_RATE} Hz, got {sample_rate}")
    signal = np.clip(np.round(np.asarray(audio, np.float64).reshape(-1) * INT16_SCALE), -INT16_SCALE, INT16_SCALE - 1)
    if signal.size == 0:
        raise ValueError("no audio samples")
    signal = np.append(signal[0], signal[1:] - PREEMPHASIS * signal[:-1])
    count = 1 if signal.size <= WIN_SAMPLES else 1 + math.ceil((signal.size - WIN_SAMPLES) / HOP_SAMPLES)
    padded = np.concatenate([signal, np.zeros((count - 1) * HOP_SAMPLES + WIN_SAMPLES - signal.size)])
    frames = padded[np.arange(WIN_SAMPLES)[None, :] + HOP_SAMPLES * np.arange(count)[:, None]]  # [N, 400]
    power = np.abs(np.fft.rfft(frames, NFFT)) ** 2 / NFFT  # [N, 257]
    eps = np.finfo(np.float64).eps
    energy = power.sum(1)
    energy = np.where(energy == 0, eps, energy)
    mel = power @ mel_filterbank(sample_rate).T
    mel = np.where(mel == 0, eps, mel)
    ceps = scipy.fft.dct(np.log(mel), type=2, axis=1, norm="ortho")[:, :NUM_CEPS]
    ceps *= 1 + (CEP_LIFTER / 2.0) * np.sin(np.pi * np.arange(NUM_CEPS) / CEP_LIFTER)
    ceps[:, 0] = np.log(energy)
    return ceps.T

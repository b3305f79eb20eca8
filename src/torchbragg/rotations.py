"""Rotations in the C program's conventions (float64 numpy).

``rotate_xyz`` turns a vector about x, then y, then z (right-handed, angles in
radians), skipping a zero angle exactly as nanoBragg does. ``rotate_axis`` is
Rodrigues' rotation about a unit axis.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["rotate_xyz", "rotate_axis", "axis_rotation_matrix", "unit"]


def unit(v) -> np.ndarray:
    """Unit vector along ``v`` (zero vector stays zero).

    Parameters
    ----------
    v : array_like of float
        A 3-vector (any length unit).

    Returns
    -------
    numpy.ndarray
        float64 ``[3]``: ``v`` divided by its length; zeros for a zero vector, NaNs when
        ``v`` holds an infinite or NaN component.
    """
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore"):
        n = float(np.sqrt(v @ v))
    if not math.isfinite(n) or (n == 0.0 and np.any(v != 0)):
        # |v|² beyond float64 (e.g. a -beam_vector of 1e200): normalise a scaled copy instead
        m = float(np.max(np.abs(v)))
        if not math.isfinite(m):
            return np.full(3, np.nan)
        w = v / m
        return w / float(np.sqrt(w @ w))
    return v / n if n != 0.0 else np.zeros(3)


def rotate_xyz(v, rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotate ``v`` about x by ``rx``, then y by ``ry``, then z by ``rz`` (radians).

    Parameters
    ----------
    v : array_like of float
        The 3-vector to rotate.
    rx, ry, rz : float
        Right-handed rotation angles about the x, y and z axes (radians); a zero
        angle is skipped.

    Returns
    -------
    numpy.ndarray
        float64 ``[3]``: the rotated vector.
    """
    x, y, z = (float(c) for c in v)
    if rx != 0:
        c, s = np.cos(rx), np.sin(rx)
        y, z = y * c - z * s, y * s + z * c
    if ry != 0:
        c, s = np.cos(ry), np.sin(ry)
        x, z = x * c + z * s, -x * s + z * c
    if rz != 0:
        c, s = np.cos(rz), np.sin(rz)
        x, y = x * c - y * s, x * s + y * c
    return np.array([x, y, z])


def rotate_axis(v, axis, angle: float) -> np.ndarray:
    """Rotate ``v`` by ``angle`` (radians) about the unit vector ``axis``.

    Parameters
    ----------
    v : array_like of float
        The 3-vector to rotate.
    axis : array_like of float
        Rotation axis, a unit 3-vector (it is not normalised here).
    angle : float
        Right-handed rotation angle (radians).

    Returns
    -------
    numpy.ndarray
        float64 ``[3]``: the rotated vector.
    """
    v = np.asarray(v, dtype=np.float64)
    return axis_rotation_matrix(axis, angle) @ v


def axis_rotation_matrix(axis, angle: float) -> np.ndarray:
    """3×3 matrix of a right-handed rotation by ``angle`` about unit ``axis``.

    Parameters
    ----------
    axis : array_like of float
        Rotation axis, a unit 3-vector (it is not normalised here).
    angle : float
        Rotation angle (radians).

    Returns
    -------
    numpy.ndarray
        float64 ``[3, 3]`` rotation matrix ``R`` (rotated vector = ``R @ v``).
    """
    ax, ay, az = (float(c) for c in axis)
    c, s = np.cos(angle), np.sin(angle)
    t = 1.0 - c
    return np.array([
        [ax * ax * t + c, ax * ay * t - az * s, ax * az * t + ay * s],
        [ay * ax * t + az * s, ay * ay * t + c, ay * az * t - ax * s],
        [az * ax * t - ay * s, az * ay * t + ax * s, az * az * t + c],
    ])

// Arithmetic shared by torchbragg's compiled kernels: the fused CPU kernel (kernel.py) and the GPU
// kernel (gpu_render.cu). Pasted by torchbragg where a source says "// @include kernel_math.h",
// after TB_HD (the functions' qualifiers), TB_DOUBLE and the typedefs ``real`` (the render dtype) and
// ``tb_table_t`` (the structure-factor table's);
// the math functions are the C library's (host) or CUDA's (device) overloads.

// sin(pi r) for |r| <= 0.5: Taylor series of sin z, z = pi r (truncation below rounding)
TB_HD real tb_sin_poly(real r) {
    const real z = r * (real)3.14159265358979323846;
    const real z2 = z * z;
    real p;
#if TB_DOUBLE
    p = (real)(-1.0 / 51090942171709440000.0);
    p = p * z2 + (real)(1.0 / 121645100408832000.0);
    p = p * z2 + (real)(-1.0 / 355687428096000.0);
    p = p * z2 + (real)(1.0 / 1307674368000.0);
    p = p * z2 + (real)(-1.0 / 6227020800.0);
#else
    p = (real)(-1.0 / 6227020800.0);
#endif
    p = p * z2 + (real)(1.0 / 39916800.0);
    p = p * z2 + (real)(-1.0 / 362880.0);
    p = p * z2 + (real)(1.0 / 5040.0);
    p = p * z2 + (real)(-1.0 / 120.0);
    p = p * z2 + (real)(1.0 / 6.0);
    return z - z * z2 * p;  // sin z = z - z^3/3! + z^5/5! - ...
}

// cos(pi r) for |r| <= 0.5: Taylor series of cos z, z = pi r (truncation below rounding)
TB_HD real tb_cos_poly(real r) {
    const real z = r * (real)3.14159265358979323846;
    const real z2 = z * z;
    real p;
#if TB_DOUBLE
    p = (real)(1.0 / 1124000727777607680000.0);
    p = p * z2 + (real)(-1.0 / 2432902008176640000.0);
    p = p * z2 + (real)(1.0 / 6402373705728000.0);
    p = p * z2 + (real)(-1.0 / 20922789888000.0);
    p = p * z2 + (real)(1.0 / 87178291200.0);
#else
    p = (real)(1.0 / 87178291200.0);
#endif
    p = p * z2 + (real)(-1.0 / 479001600.0);
    p = p * z2 + (real)(1.0 / 3628800.0);
    p = p * z2 + (real)(-1.0 / 40320.0);
    p = p * z2 + (real)(1.0 / 720.0);
    p = p * z2 + (real)(-1.0 / 24.0);
    p = p * z2 + (real)(1.0 / 2.0);
    return (real)1 - z2 * p;  // cos z = 1 - z^2/2! + z^4/4! - ...
}

// cos(pi y) for any y: reduce by the nearest integer k, sign (-1)^k
TB_HD real tb_cospi(real y) {
    const real k = rint(y);
    const real half = k * (real)0.5;
    const real odd = half - floor(half);  // 0 or 0.5
    return ((real)1 - (real)4 * odd) * tb_cos_poly(y - k);
}

// sin(pi y) for any y: reduce by the nearest integer k, sign (-1)^k
TB_HD real tb_sinpi(real y) {
    const real k = rint(y);
    const real half = k * (real)0.5;
    const real odd = half - floor(half);  // 0 or 0.5
    return ((real)1 - (real)4 * odd) * tb_sin_poly(y - k);
}

// sin(pi N h) / sin(pi h) through f = h - h0, h0 the nearest integer (f in (-0.5, 0.5]): an exact
// identity that avoids the sine of a large argument
TB_HD real tb_sincg(real f, double h0, real n, bool n_even) {
    const real v = (f == (real)0) ? n : tb_sinpi(n * f) / tb_sin_poly(f);
    const double half = h0 * 0.5;
    const bool odd = (half - floor(half)) != 0.0;
    return (n_even && odd) ? -v : v;
}

// Lattice factor of a round crystal (-round_xtal): Na Nb Nc 0.7236 3 (sin x / x - cos x) / x^2 with
// x = pi sqrt(hrad fudge), hrad = sum of (N f)^2 over the axes; sin and cos through tb_sinpi/tb_cospi
// of sqrt(hrad fudge), which vectorise where the C library's sin and cos do not
TB_HD real tb_round_factor(real hrad, real fudge, real nprod) {
    const real y = sqrt(hrad * fudge);
    const real x = (real)3.14159265358979323846 * y;
    const real xs = x == (real)0 ? (real)1 : x;
    const real s3 = (real)3 * (tb_sinpi(y) / xs - tb_cospi(y)) / (xs * xs);
    return nprod * (real)0.723601254558268 * (x == (real)0 ? (real)1 : s3);
}

// Polarisation factor of a diffracted unit direction d for a source sp (incident unit vector sp[0..2],
// the polarisation frame's B at sp[4..6] and E at sp[7..9]), Kahn factor kahn:
// 0.5 (1 + cos^2 2theta - kahn cos(2 psi) sin^2 2theta), psi = -atan2(d.B, d.E), with
// cos(2 psi) = (x^2 - y^2) / (x^2 + y^2); 1 with -nopolar
TB_HD double tb_polar(double dx, double dy, double dz, const double* sp, double kahn, bool nopolar) {
    const double cos2t = dx * sp[0] + dy * sp[1] + dz * sp[2];
    const double c2 = cos2t * cos2t, s2 = 1.0 - c2;
    const double yb = dx * sp[4] + dy * sp[5] + dz * sp[6];
    const double xe = dx * sp[7] + dy * sp[8] + dz * sp[9];
    const double r2 = xe * xe + yb * yb;
    const double cos2psi = r2 > 0.0 ? (xe * xe - yb * yb) / (r2 > 0.0 ? r2 : 1.0) : 1.0;
    return nopolar ? 1.0 : 0.5 * (1.0 + c2 - kahn * cos2psi * s2);
}

// Lagrange weights of the points -1, 0, 1, 2 at t (tricubic interpolation, float64)
TB_HD void tb_lagrange(double t, double* w) {
    const double tm1 = t - 1.0, tm2 = t - 2.0, tp1 = t + 1.0;
    w[0] = -t * tm1 * tm2 / 6.0;
    w[1] = tp1 * tm1 * tm2 / 2.0;
    w[2] = -tp1 * t * tm2 / 2.0;
    w[3] = tp1 * t * tm1 / 6.0;
}

// Tricubic Lagrange interpolation of the structure-factor table at fractional (h, k, l), in float64
// like the eager kernel: the 4x4x4 neighbourhood floor - 1 .. floor + 2 on each axis. lo: the table's
// lowest h, k, l; nh, nk, nl: its extent (each at least 4). The neighbourhood's start is clamped into
// the table only to keep every read inside it: the callers interpolate only where C does, where the
// whole neighbourhood lies inside, and discard what skipped evaluations read.
TB_HD double tb_tricubic(const tb_table_t* table, double h, double k, double l, const double* lo,
                         double nh, double nk, double nl) {
    const double fh = floor(h), fk = floor(k), fl = floor(l);
    double wh[4], wk[4], wl[4];
    tb_lagrange(h - fh, wh);
    tb_lagrange(k - fk, wk);
    tb_lagrange(l - fl, wl);
    const double hs = fmin(fmax(fh - 1.0 - lo[0], 0.0), nh - 4.0);
    const double ks = fmin(fmax(fk - 1.0 - lo[1], 0.0), nk - 4.0);
    const double ls = fmin(fmax(fl - 1.0 - lo[2], 0.0), nl - 4.0);
    const tb_table_t* t = table + (long long)((hs * nk + ks) * nl + ls);
    const long long sh = (long long)(nk * nl), sk = (long long)nl;
    double val = 0.0;
    for (int i = 0; i < 4; ++i) {
        double vj = 0.0;
        for (int j = 0; j < 4; ++j) {
            const tb_table_t* r = t + i * sh + j * sk;
            vj += ((double)r[0] * wl[0] + (double)r[1] * wl[1] + (double)r[2] * wl[2] + (double)r[3] * wl[3]) * wk[j];
        }
        val += vj * wh[i];
    }
    return val;
}

// v turned by angle about the unit axis a (Rodrigues' formula, the eager kernel's order of operations)
TB_HD void tb_rotate(double* v, const double* a, double angle) {
    const double c = cos(angle), s = sin(angle);
    const double x = v[0], y = v[1], z = v[2];
    const double dot = x * a[0] + y * a[1] + z * a[2];
    const double cx = a[1] * z - a[2] * y, cy = a[2] * x - a[0] * z, cz = a[0] * y - a[1] * x;
    v[0] = a[0] * dot * (1.0 - c) + x * c + cx * s;
    v[1] = a[1] * dot * (1.0 - c) + y * c + cy * s;
    v[2] = a[2] * dot * (1.0 - c) + z * c + cz * s;
}

// -curved_det: C takes the flat position's lab y and z (metres) as arc lengths at the sample distance:
// the point distance*beam turned about the slow axis by y/distance, then about the fast axis by
// z/distance. p: the flat position in, the curved one out; dp: the packed parameters.
TB_HD void tb_curve(double* p, const double* dp) {
    const double dist = dp[D_distance], a1 = p[1] / dist, a2 = p[2] / dist;
    p[0] = dist * dp[D_beam + 0];
    p[1] = dist * dp[D_beam + 1];
    p[2] = dist * dp[D_beam + 2];
    tb_rotate(p, dp + D_sdet, a1);
    tb_rotate(p, dp + D_fdet, a2);
}

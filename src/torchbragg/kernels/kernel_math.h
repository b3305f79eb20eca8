// The arithmetic and physics both compiled kernels share: the CPU kernel (cpu_render.cpp) and the
// GPU kernel (gpu_render.cu) include this file (#include "kernel_math.h": -I for the C++ compiler,
// the header list for NVRTC) after defining TB_HD (the functions' qualifiers), TB_DOUBLE and the
// typedefs ``real`` (the render dtype) and ``tb_table_t`` (the structure-factor table's); the math
// functions are the C library's (host) or CUDA's (device) overloads. The second half, one
// evaluation's physics, lists what more it needs.

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

// ---------------------------------------------------------------- one evaluation's physics
// What both compiled kernels compute per evaluation, in C's order of operations: the detector
// point, its solid angle and sensor capture, the scattering vector and -dmin, h k l, the lattice
// factor of the crystal shape (TB_SHAPE), the structure-factor lookup with its fallback counts,
// the intensity, its accumulation under the -oversample_* rule (TB_OVER), and the pixel's value.
// Before including this file a source defines TB_HD, TB_DOUBLE, TB_SHAPE, TB_TABLE, TB_COUNT,
// TB_INTERP and TB_OVER, the typedefs ``real`` and ``tb_table_t``, TB_EXP (the exponential of the
// gauss lattice factor: the CPU kernel's vectorising one, CUDA's exp) and TB_INDEX (the table
// index type: int vectorises the CPU kernel's gathers).

// tophat spots: a lattice factor of Na Nb Nc where rad * fudge < 0.3969 (C); gauss: exp(-rad/0.63 fudge)
#define TB_TOPHAT_LIMIT 0.3969
#define TB_GAUSS_WIDTH 0.63

// one coordinate of the flat detector point: fast offset along f, the slow part (Sdet times the slow
// axis's coordinate), the sensor layer's offset along o, pix0
TB_HD double tb_flat_coordinate(double fdet, double f, double slow_part, double toff, double o, double p0) {
    return fdet * f + slow_part + toff * o + p0;
}

// the solid angle of a subpixel at distance air (m): 1/air^2 for -point_pixel, else
// pixel^2 / air^2 * close_distance / air
TB_HD double tb_solid_angle(double air, double pix, double close, bool point_pixel) {
    return point_pixel ? 1.0 / (air * air) : pix * pix / (air * air) * close / air;
}

// the fraction of the beam layer t of thickness thickstep (attenuation mu) captures at parallax
// (the diffracted direction's cosine with the sensor normal); nothing from behind (parallax <= 0)
TB_HD double tb_capture(double t, double thickstep, double mu, double parallax) {
    return parallax > 0.0 ? exp(-t * thickstep * mu / parallax) - exp(-(t + 1.0) * thickstep * mu / parallax)
                          : 0.0;
}

// -dmin: whether the scattering vector (X, Y, Z) (1/A) reaches beyond the resolution limit dmin
TB_HD bool tb_dmin_skip(double X, double Y, double Z, double dmin) {
    const double stol = 0.5 * sqrt(X * X + Y * Y + Z * Z);
    return (stol > 0.0) && (dmin > 0.5 / (stol > 0.0 ? stol : 1.0));
}

// the fractional index along one lattice vector (a0, a1, a2) of the scattering vector (X, Y, Z)
TB_HD double tb_index(double X, double Y, double Z, double a0, double a1, double a2) {
    return X * a0 + Y * a1 + Z * a2;
}

// the nearest integer index (C: ceil(h - 0.5))
TB_HD double tb_nearest(double h) { return ceil(h - 0.5); }

// The lattice factor of the evaluation at (h, k, l), nearest (h0, k0, l0), for TB_SHAPE: 0 square
// (sincg per axis, N the axes' counts, *_even: N even), 1 round, 2 gauss, 3 tophat (those two
// through the unrotated reciprocal vectors a* b* c* at dp[D_a_star] and dp[D_N2prod], dp[D_Nprod])
TB_HD real tb_lattice_factor(double h, double k, double l, double h0, double k0, double l0, real na, real nb,
                             real nc, bool na_even, bool nb_even, bool nc_even, real fudge, const double* dp) {
#if TB_SHAPE == 0
    (void)fudge; (void)dp;
    return tb_sincg((real)(h - h0), h0, na, na_even) * tb_sincg((real)(k - k0), k0, nb, nb_even)
           * tb_sincg((real)(l - l0), l0, nc, nc_even);
#elif TB_SHAPE == 1
    (void)na_even; (void)nb_even; (void)nc_even; (void)dp;
    const real fh = (real)(h - h0), fk = (real)(k - k0), fl = (real)(l - l0);
    return tb_round_factor(fh * fh * na * na + fk * fk * nb * nb + fl * fl * nc * nc, fudge, na * nb * nc);
#else
    (void)na; (void)nb; (void)nc; (void)na_even; (void)nb_even; (void)nc_even;
    const double dh = h - h0, dk = k - k0, dl = l - l0;
    const double* A = dp + D_a_star;
    const double u = dh * A[0] + dk * A[3] + dl * A[6];
    const double v = dh * A[1] + dk * A[4] + dl * A[7];
    const double w = dh * A[2] + dk * A[5] + dl * A[8];
    const real rad = (real)((u * u + v * v + w * w) * dp[D_N2prod]);
#if TB_SHAPE == 2
    return (real)dp[D_Nprod] * TB_EXP(-(rad / (real)TB_GAUSS_WIDTH * fudge));
#else
    return (real)dp[D_Nprod] * (real)(rad * fudge < (real)TB_TOPHAT_LIMIT);
#endif
#endif
}

#if TB_TABLE
// The table's box in float64 (exact for integers: no out-of-range integer conversion)
struct TbBox {
    double hmin, hmax, kmin, kmax, lmin, lmax, nh, nk, nl, size;
};

TB_HD TbBox tb_box(const i64_t* ip) {
    TbBox b;
    b.hmin = (double)ip[I_bounds + 0]; b.hmax = (double)ip[I_bounds + 1];
    b.kmin = (double)ip[I_bounds + 2]; b.kmax = (double)ip[I_bounds + 3];
    b.lmin = (double)ip[I_bounds + 4]; b.lmax = (double)ip[I_bounds + 5];
    b.nh = b.hmax - b.hmin + 1.0; b.nk = b.kmax - b.kmin + 1.0; b.nl = b.lmax - b.lmin + 1.0;
    b.size = b.nh * b.nk * b.nl;
    return b;
}

// The structure factor at (h0, k0, l0): the table's entry inside the box, else the extra last entry,
// which holds default_F (so the load is a plain gather); ``inside`` says which
TB_HD real tb_lookup(const tb_table_t* table, const TbBox& b, double h0, double k0, double l0, bool& inside) {
    inside = (h0 >= b.hmin) & (h0 <= b.hmax) & (k0 >= b.kmin) & (k0 <= b.kmax) & (l0 >= b.lmin) & (l0 <= b.lmax);
    const double didx = ((h0 - b.hmin) * b.nk + (k0 - b.kmin)) * b.nl + (l0 - b.lmin);
    return (real)table[(TB_INDEX)(inside ? didx : b.size)];
}
#endif

// Fallback counting of one evaluation not skipped: with a table, the counting table's sign bit marks
// default_F entries (unlisted ones and the extra entry outside the box); without one every lookup is
// default_F
TB_HD void tb_count_fallback(bool skipped, real Fc, bool inside, u32_t& n_default, u32_t& n_outside) {
#if TB_TABLE
    n_default += skipped ? 0u : (TB_SIGNBIT(Fc) ? 1u : 0u);
    n_outside += (skipped | inside) ? 0u : 1u;
#else
    (void)Fc; (void)inside; (void)n_outside;
    n_default += skipped ? 0u : 1u;
#endif
}

// The intensity of one evaluation: |F_cell F_latt|^2, 0 where skipped (-dmin, a zero lattice factor)
TB_HD real tb_intensity(real Fc, real Fl, bool skipped) { return skipped ? (real)0 : Fc * Fc * Fl * Fl; }

// Add an evaluation's intensity I to the pixel's sum acc: TB_OVER 1 C's running product with the
// -oversample_* factors fpol, 2 each term weighted by its factors (their sum in fsum), 0 plain sum
TB_HD void tb_accumulate(double& acc, double& fsum, real I, bool skipped, double fpol) {
#if TB_OVER == 1
    (void)fsum;
    acc = skipped ? acc : (acc + (double)I) * fpol;
#elif TB_OVER == 2
    (void)skipped;
    acc += (double)I * fpol;
    fsum += fpol;
#else
    (void)fsum; (void)skipped; (void)fpol;
    acc += (double)I;
#endif
}

// The pixel's value from its sum: the background, the scale, and the factors C applies once per
// pixel (the last layer's capture, the first polarisation and solid angle) unless -oversample_* applied
// them per evaluation; nsub subpixels of S * P * M evaluations each (``evals``)
TB_HD double tb_pixel_value(double acc, double fsum, double nsub, double evals, double I_bg, double scale,
                            double cap_last, double pol_first, double om_first, bool ov_thick, bool ov_polar,
                            bool ov_omega) {
#if TB_OVER
    const double sum = TB_OVER == 1 ? acc : acc + I_bg * fsum / (nsub * evals);
    return sum * scale * (ov_thick ? 1.0 : cap_last) * (ov_polar ? 1.0 : pol_first) * (ov_omega ? 1.0 : om_first);
#else
    (void)fsum; (void)nsub; (void)evals; (void)ov_thick; (void)ov_polar; (void)ov_omega;
    return (acc + I_bg) * scale * cap_last * pol_first * om_first;
#endif
}

// A pixel's fallback count and dominant reason: interpolated lookups never use default_F; without a
// table 1, with one 3 (unlisted) only when it outnumbers 2 (outside the box); 0 for none
TB_HD u32_t tb_fallback_total(u32_t n_default) { return TB_INTERP ? 0u : n_default; }
TB_HD unsigned char tb_dominant_reason(u32_t total, u32_t n_outside) {
    const unsigned char dom = TB_TABLE ? (total - n_outside > n_outside ? 3 : 2) : 1;
    return total > 0 ? dom : (unsigned char)0;
}

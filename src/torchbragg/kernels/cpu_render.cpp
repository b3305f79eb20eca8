// torchbragg's CPU render kernel: a block of columns at a time, vectorised across them.
//
// Compiled on first use by torchbragg.kernels.cpu with -DTB_REAL=float|double -DTB_SHAPE=0..3
// -DTB_TABLE=0|1 -DTB_COUNT=0|1 -DTB_INTERP=0|1 -DTB_OVER=0..2 (TB_OVER: -oversample_thick/_polar/_omega
// factors per evaluation, 1 as C's running product of the pixel's sum, 2 each term weighted by its own
// factors; which factors: I_ov_*) and the parameter indices -DD_*=, -DI_*= of
// torchbragg.kernels.packing. The physics of one evaluation is kernel_math.h's, shared with the GPU
// kernel, the common definitions and the vectorised exponential cpu_kernel.h's; this file holds the loops and
// the switch-off scan.
#include "cpu_kernel.h"

#if TB_INTERP
typedef double tb_table_t;  // interpolation reads 64 entries a lookup: the table comes widened already
#else
typedef real tb_table_t;
#endif

#include "kernel_math.h"

// -curved_det positions of a block of n columns from cstart (fast subpixel offset fo, slow part bx..bz,
// sensor layer offset toff), the flat position's arithmetic of the render loop, then tb_curve
static inline void tb_curved_block(double* X, double* Y, double* Z, int n, int64_t cstart, int64_t os, double fo,
                                   double bx, double by, double bz, double toff, const double* dp) {
    const double sub = dp[D_subpixel];
    for (int c = 0; c < n; ++c) {
        const double Fdet = ((double)((cstart + c) * os) + fo) * sub;
        double p[3] = {tb_flat_coordinate(Fdet, dp[D_fdet + 0], bx, toff, dp[D_odet + 0], dp[D_pix0 + 0]),
                       tb_flat_coordinate(Fdet, dp[D_fdet + 1], by, toff, dp[D_odet + 1], dp[D_pix0 + 1]),
                       tb_flat_coordinate(Fdet, dp[D_fdet + 2], bz, toff, dp[D_odet + 2], dp[D_pix0 + 2])};
        tb_curve(p, dp);
        X[c] = p[0]; Y[c] = p[1]; Z[c] = p[2];
    }
}

#if TB_COUNT
// one block's fallback counts (int8, int16 or int32: the smallest that holds a pixel's evaluations)
// and dominant reasons, ties to the lower code: 1 without a table; with one, 3 (unlisted) only when
// it outnumbers 2 (outside the box)
template <typename C>
static inline void store_counts(C* cs, uint8_t* rs, const uint8_t* mrow, const uint32_t* cnt,
                                const uint32_t* cnt_out, int n) {
#pragma omp simd
    for (int c = 0; c < n; ++c) {
        const bool active = mrow == nullptr || mrow[c] != 0;
        const uint32_t tot = tb_fallback_total(cnt[c]);
        cs[c] = (C)(active ? tot : 0u);
        rs[c] = active ? tb_dominant_reason(tot, cnt_out[c]) : (uint8_t)0;
    }
}
#endif

// Fallback counting (TB_COUNT): with a table, ``table`` is the flagged copy whose sign bit marks the
// entries that are default_F (unlisted ones and the extra last entry used outside the box; the values
// are only ever squared here), so counting needs no second gather: two 32-bit counters per pixel, the
// evaluations that used default_F and those of them outside the box. Interpolated lookups never use
// default_F, so the interpolating variant writes zero counts.
extern "C" int tb_render(const double* dp, const int64_t* ip, const double* lattice, const double* src,
                        const tb_table_t* table, const uint8_t* mask,
                        int64_t row0, int64_t nrows, int64_t col0, int64_t ncols,
                        real* image, int64_t image_stride, void* counts, uint8_t* reasons,
                        int64_t fb_stride, double* row_stats) {
    const int64_t os = ip[I_oversample], T = ip[I_T], S = ip[I_S], P = ip[I_P], M = ip[I_M];
    const int64_t fpixels = ip[I_fpixels];
    const bool point_pixel = ip[I_point_pixel] != 0, nopolar = ip[I_nopolar] != 0;
    const bool thick_on = ip[I_thick_on] != 0, dmin_on = ip[I_dmin_on] != 0, water = ip[I_water] != 0;
    const bool curved = ip[I_curved] != 0;
    const double sub = dp[D_subpixel], pix = dp[D_pixel], close = dp[D_close];
    const double fx = dp[D_fdet + 0], fy = dp[D_fdet + 1], fz = dp[D_fdet + 2];
    const double sx_ = dp[D_sdet + 0], sy_ = dp[D_sdet + 1], sz_ = dp[D_sdet + 2];
    const double ox = dp[D_odet + 0], oy = dp[D_odet + 1], oz = dp[D_odet + 2];
    const double p0x = dp[D_pix0 + 0], p0y = dp[D_pix0 + 1], p0z = dp[D_pix0 + 2];
    const double thickstep = dp[D_thickstep], mu = dp[D_mu], dmin = dp[D_dmin], kahn = dp[D_kahn];
    const double I_bg = dp[D_I_bg], scale = dp[D_scale];
    const real na = (real)dp[D_N + 0], nb = (real)dp[D_N + 1], nc = (real)dp[D_N + 2];
    const bool na_even = ((int64_t)dp[D_N + 0] - 1) % 2 != 0;
    const bool nb_even = ((int64_t)dp[D_N + 1] - 1) % 2 != 0;
    const bool nc_even = ((int64_t)dp[D_N + 2] - 1) % 2 != 0;
    const real default_F = (real)dp[D_default_F];
    const double fudge = dp[D_fudge];
    (void)fudge; (void)table; (void)counts; (void)reasons; (void)fb_stride;
    const int64_t count_bytes = ip[I_count_bytes];
    (void)count_bytes;
#if TB_TABLE
    const TbBox box = tb_box(ip);
    const double lo[3] = {box.hmin, box.kmin, box.lmin};
    (void)lo;
#endif
    const int64_t first_sub = 0, last_t = T - 1;
    (void)first_sub;

    alignas(64) double dx[CB], dy[CB], dz[CB], cap[CB];
    alignas(64) double qx[CB], qy[CB], qz[CB];
    alignas(64) double dskip[CB];  // 1.0 where -dmin skips the (subpixel, source)
    alignas(64) double acc[CB], om_first[CB], cap_last[CB], pol_first[CB];
#if TB_OVER
    // per-evaluation factors of the -oversample_* flags: fsub per subpixel (capture, omega), fpol per
    // (subpixel, source) (times polarisation); fsum their sum (TB_OVER 2); om_sum the solid angles
    const bool ov_thick = ip[I_ov_thick] != 0, ov_polar = ip[I_ov_polar] != 0, ov_omega = ip[I_ov_omega] != 0;
    alignas(64) double fsub[CB], fpol[CB], fsum[CB], om_sum[CB];
#endif
    alignas(64) unsigned char found[CB];
#if TB_COUNT
    alignas(64) uint32_t cnt[CB], cnt_out[CB];
#endif

    for (int64_t r = 0; r < nrows; ++r) {
        const int64_t row = row0 + r;
        double omega_row = 0.0;
        for (int64_t cb = 0; cb < ncols; cb += CB) {
            const int n = (int)((ncols - cb) < CB ? (ncols - cb) : CB);
            const int64_t cstart = col0 + cb;
            for (int c = 0; c < n; ++c) {
                acc[c] = 0.0; om_first[c] = 0.0; cap_last[c] = 1.0; pol_first[c] = 0.0; found[c] = 0;
#if TB_OVER
                acc[c] = TB_OVER == 1 ? I_bg : 0.0;  // C's running product starts from the background
                fsum[c] = 0.0; om_sum[c] = 0.0;
#endif
#if TB_COUNT
                cnt[c] = 0; cnt_out[c] = 0;
#endif
            }
            int n_found = 0;
            for (int64_t t = 0; t < T; ++t) {
                const double toff = (double)t * thickstep;
                for (int64_t ss = 0; ss < os; ++ss) {
                    const double Sdet = ((double)(row * os) + ((double)ss + 0.5)) * sub;
                    const double bx = Sdet * sx_, by = Sdet * sy_, bz = Sdet * sz_;
                    for (int64_t sf = 0; sf < os; ++sf) {
                        const double fo = (double)sf + 0.5;
                        const bool first_sub_px = (t == 0 && ss == 0 && sf == 0);
                        const bool last_cap = (t == last_t && ss == 0 && sf == 0);
                        if (curved)  // positions on the sphere first (a loop of its own keeps the flat one vectorised)
                            tb_curved_block(dx, dy, dz, n, cstart, os, fo, bx, by, bz, toff, dp);
#pragma omp simd
                        for (int c = 0; c < n; ++c) {
                            const double Fdet = ((double)((cstart + c) * os) + fo) * sub;
                            const double px = curved ? dx[c] : tb_flat_coordinate(Fdet, fx, bx, toff, ox, p0x);
                            const double py = curved ? dy[c] : tb_flat_coordinate(Fdet, fy, by, toff, oy, p0y);
                            const double pz = curved ? dz[c] : tb_flat_coordinate(Fdet, fz, bz, toff, oz, p0z);
                            const double air = std::sqrt(px * px + py * py + pz * pz);
                            const double inv = 1.0 / air;
                            dx[c] = px * inv; dy[c] = py * inv; dz[c] = pz * inv;
                            if (first_sub_px)
                                om_first[c] = tb_solid_angle(air, pix, close, point_pixel);
#if TB_OVER
                            const double om = tb_solid_angle(air, pix, close, point_pixel);
                            om_sum[c] += om;
                            fsub[c] = ov_omega ? om : 1.0;
#endif
                        }
                        if (thick_on) {
                            for (int c = 0; c < n; ++c) {
                                const double parallax = dx[c] * ox + dy[c] * oy + dz[c] * oz;
                                cap[c] = tb_capture((double)t, thickstep, mu, parallax);
                            }
                            if (last_cap)
                                for (int c = 0; c < n; ++c) cap_last[c] = cap[c];
#if TB_OVER
                            if (ov_thick)
                                for (int c = 0; c < n; ++c) fsub[c] *= cap[c];
#endif
                        }
                        for (int64_t s = 0; s < S; ++s) {
                            const double* sp = src + 10 * s;
                            const double ix = sp[0], iy = sp[1], iz = sp[2], il = sp[3];
#pragma omp simd
                            for (int c = 0; c < n; ++c) {
                                const double X = (dx[c] - ix) * il, Y = (dy[c] - iy) * il, Z = (dz[c] - iz) * il;
                                qx[c] = X; qy[c] = Y; qz[c] = Z;
                                dskip[c] = (dmin_on && tb_dmin_skip(X, Y, Z, dmin)) ? 1.0 : 0.0;
                            }
#if TB_OVER
#pragma omp simd
                            for (int c = 0; c < n; ++c) {  // this (subpixel, source)'s polarisation
                                const double polar = tb_polar(dx[c], dy[c], dz[c], sp, kahn, nopolar);
                                fpol[c] = ov_polar ? fsub[c] * polar : fsub[c];
                            }
#endif
                            if (n_found < n) {
                                // polarisation of the first (subpixel, source) not skipped by -dmin
                                int newly = 0;
#pragma omp simd reduction(+ : newly)
                                for (int c = 0; c < n; ++c) {
                                    const double polar = tb_polar(dx[c], dy[c], dz[c], sp, kahn, nopolar);
                                    const bool take = !found[c] && dskip[c] == 0.0;
                                    pol_first[c] = take ? polar : pol_first[c];
                                    found[c] = take ? 1 : found[c];
                                    newly += take ? 1 : 0;
                                }
                                n_found += newly;
                            }
                            for (int64_t pm = 0; pm < P * M; ++pm) {
                                const double* L = lattice + 9 * pm;
                                const double a0 = L[0], a1 = L[1], a2 = L[2];
                                const double b0 = L[3], b1 = L[4], b2 = L[5];
                                const double e0 = L[6], e1 = L[7], e2 = L[8];
#pragma omp simd
                                for (int c = 0; c < n; ++c) {
                                    const double X = qx[c], Y = qy[c], Z = qz[c];
                                    const double h = tb_index(X, Y, Z, a0, a1, a2);
                                    const double k = tb_index(X, Y, Z, b0, b1, b2);
                                    const double l = tb_index(X, Y, Z, e0, e1, e2);
                                    const double h0 = tb_nearest(h), k0 = tb_nearest(k), l0 = tb_nearest(l);
                                    const real Fl = tb_lattice_factor(h, k, l, h0, k0, l0, na, nb, nc, na_even,
                                                                      nb_even, nc_even, (real)fudge, dp);
                                    // a zero lattice factor skips the lookup (C); sin(pi N h) of a square crystal is
                                    // never exactly zero in C's float64 or the eager kernel, but the reduced
                                    // argument here can be, so square crystals never skip on it
                                    const bool skipped = (dskip[c] != 0.0)
                                                         | (!water & (TB_SHAPE != 0) & (Fl == (real)0));
                                    real Fc;
                                    bool inside = false;
#if TB_TABLE
                                    Fc = tb_lookup(table, box, h0, k0, l0, inside);
#if TB_INTERP
                                    // tricubic Lagrange interpolation (kernel_math.h), where C interpolates
                                    {
                                        const double val = tb_tricubic(table, h, k, l, lo, box.nh, box.nk, box.nl);
                                        Fc = skipped ? Fc : (real)val;
                                    }
#endif
#else
                                    Fc = default_F;
#endif
#if TB_COUNT && !TB_INTERP
                                    tb_count_fallback(skipped, Fc, inside, cnt[c], cnt_out[c]);
#endif
                                    (void)inside;
#if TB_OVER
                                    tb_accumulate(acc[c], fsum[c], tb_intensity(Fc, Fl, skipped), skipped, fpol[c]);
#else
                                    double no_fsum = 0.0;
                                    tb_accumulate(acc[c], no_fsum, tb_intensity(Fc, Fl, skipped), skipped, 1.0);
#endif
                                }
                            }
                        }
                    }
                }
            }
            const double nsub = (double)(T * os * os);
            real* out = image + r * image_stride + cb;
            const uint8_t* mrow = mask != nullptr ? mask + row * fpixels + cstart : nullptr;
            double om_blk = 0.0;
#pragma omp simd reduction(+ : om_blk)
            for (int c = 0; c < n; ++c) {
                const bool active = mrow == nullptr || mrow[c] != 0;
#if TB_OVER
                const double v = tb_pixel_value(acc[c], fsum[c], nsub, (double)(S * P * M), I_bg, scale, cap_last[c],
                                                pol_first[c], om_first[c], ov_thick, ov_polar, ov_omega);
                om_blk += active ? (ov_omega ? om_sum[c] : nsub * om_first[c]) : 0.0;
#else
                const double v = tb_pixel_value(acc[c], 0.0, nsub, (double)(S * P * M), I_bg, scale, cap_last[c],
                                                pol_first[c], om_first[c], false, false, false);
                om_blk += active ? nsub * om_first[c] : 0.0;
#endif
                out[c] = active ? (real)v : (real)0;
            }
            omega_row += om_blk;
#if TB_COUNT
            uint8_t* rs = reasons + r * fb_stride + cb;
            const int64_t at = r * fb_stride + cb;
            if (count_bytes == 1)
                store_counts((int8_t*)counts + at, rs, mrow, cnt, cnt_out, n);
            else if (count_bytes == 2)
                store_counts((int16_t*)counts + at, rs, mrow, cnt, cnt_out, n);
            else
                store_counts((int32_t*)counts + at, rs, mrow, cnt, cnt_out, n);
#endif
        }
        // C's statistics work on the float image: values rounded to float32. Per row: count, sum and
        // sum of squares of the rendered (active) pixels, the first maximum and its column, the
        // solid angle; and, for C's rmsd pass over every ROI pixel (masked ones are 0), the squared
        // deviations of all the row's ROI pixels from their own mean, and how many there are
        const real* out = image + r * image_stride;
        const uint8_t* mrow = mask != nullptr ? mask + row * fpixels + col0 : nullptr;
        double cnt = 0.0, sum = 0.0, sumsq = 0.0, vmax = -INFINITY, amax = -1.0;
#pragma omp simd reduction(+ : cnt, sum, sumsq) reduction(max : vmax)
        for (int64_t c = 0; c < ncols; ++c) {
            const bool active = mrow == nullptr || mrow[c] != 0;
            const double v = active ? (double)(float)out[c] : 0.0;
            cnt += active ? 1.0 : 0.0;
            sum += v;
            sumsq += v * v;
            vmax = active && v > vmax ? v : vmax;
        }
        for (int64_t c = 0; c < ncols; ++c) {  // first column holding the maximum
            if ((mrow == nullptr || mrow[c] != 0) && (double)(float)out[c] == vmax) { amax = (double)c; break; }
        }
        const double roi_mean = ncols > 0 ? sum / (double)ncols : 0.0;
        double m2 = 0.0;
#pragma omp simd reduction(+ : m2)
        for (int64_t c = 0; c < ncols; ++c) {
            const bool active = mrow == nullptr || mrow[c] != 0;
            const double d = (active ? (double)(float)out[c] : 0.0) - roi_mean;
            m2 += d * d;
        }
        double* st = row_stats + 8 * r;
        st[0] = cnt; st[1] = sum; st[2] = sumsq; st[3] = m2; st[4] = vmax; st[5] = amax; st[6] = omega_row;
        st[7] = (double)ncols;
    }
    return 0;
}

// The shared arithmetic in this variant's dtype, for tests: out[i] = f(x[i]) with f by ``which``:
// 0 sin(pi x), 1 cos(pi x), 2 e^x, 3 the round-crystal factor of hrad = x (fudge 1, N 1)
extern "C" int tb_math_probe(int64_t which, const double* x, double* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const real v = (real)x[i];
        out[i] = which == 0 ? (double)tb_sinpi(v) : which == 1 ? (double)tb_cospi(v)
                 : which == 2 ? (double)tb_exp(v) : (double)tb_round_factor(v, (real)1, (real)1);
    }
    return 0;
}

#if TB_TABLE && TB_INTERP
static inline double min2(double a, double b) { return a < b ? a : b; }

// C's interpolation switch-off scan: the first evaluation, in C's loop order, of rows row0.. and
// columns col0..col0+ncols-1 whose 4x4x4 neighbourhood leaves the table and that is not skipped
// (-dmin, or a zero lattice factor), among the pixels the mask renders. The geometry is the
// render's, which can differ from the eager kernel's in the last bits, so every test keeps a margin:
// an evaluation is certainly inside, certainly outside, certainly (not) skipped, or unsure. The
// result is the global ordinal (row*fpixels + col)*E + e of the first evaluation that is not
// certainly harmless, and whether it certainly leaves the table (result[1] = 1) or the caller has
// to decide it with the eager kernel (0); result[0] = -1 when there is none. Rows are scanned in
// order and the scan returns at the first such evaluation.
extern "C" int tb_scan(const double* dp, const int64_t* ip, const double* lattice, const double* src,
                       const uint8_t* mask, int64_t row0, int64_t nrows, int64_t col0, int64_t ncols,
                       int64_t* result) {
    const int64_t os = ip[I_oversample], T = ip[I_T], S = ip[I_S], P = ip[I_P], M = ip[I_M];
    const int64_t fpixels = ip[I_fpixels];
    const bool dmin_on = ip[I_dmin_on] != 0, water = ip[I_water] != 0, curved = ip[I_curved] != 0;
    const double sub = dp[D_subpixel];
    const double fx = dp[D_fdet + 0], fy = dp[D_fdet + 1], fz = dp[D_fdet + 2];
    const double sx_ = dp[D_sdet + 0], sy_ = dp[D_sdet + 1], sz_ = dp[D_sdet + 2];
    const double ox = dp[D_odet + 0], oy = dp[D_odet + 1], oz = dp[D_odet + 2];
    const double p0x = dp[D_pix0 + 0], p0y = dp[D_pix0 + 1], p0z = dp[D_pix0 + 2];
    const double thickstep = dp[D_thickstep], dmin = dp[D_dmin], fudge = dp[D_fudge];
    const double na = dp[D_N + 0], nb = dp[D_N + 1], nc = dp[D_N + 2];
    const double Nprod = dp[D_Nprod], N2prod = dp[D_N2prod], eps = dp[D_scan_eps];
    const double* A = dp + D_a_star;
    const double hmin = (double)ip[I_bounds + 0], hmax = (double)ip[I_bounds + 1];
    const double kmin = (double)ip[I_bounds + 2], kmax = (double)ip[I_bounds + 3];
    const double lmin = (double)ip[I_bounds + 4], lmax = (double)ip[I_bounds + 5];
    const double hr = hmax - hmin + 1.0, kr = kmax - kmin + 1.0, lr = lmax - lmin + 1.0;
    const int64_t PM = P * M, E = T * os * os * S * PM;
    const int64_t NONE = INT64_MAX;
    // a lattice factor that is certainly zero / certainly not zero (square crystals: never zero)
    const int shape = TB_SHAPE;
    const bool fl_matters = !water && shape != 0;
    const bool n_zero = Nprod == 0.0;
    // gauss: Nprod * exp(-z) is zero in the render precision below log(smallest subnormal / 2)
    const double ln_tiny = (TB_DOUBLE ? -744.4400719213812 : -103.27892990343184) - 0.6931471805599453;
    const double ln_n = n_zero ? -INFINITY : std::fmin(0.0, std::log(std::fabs(Nprod)));
    (void)na; (void)nb; (void)nc; (void)A; (void)N2prod; (void)fudge; (void)ln_tiny; (void)ln_n;

    alignas(64) double dx[CB], dy[CB], dz[CB], qx[CB], qy[CB], qz[CB];
    alignas(64) double dskip[CB];  // -dmin: 1 certainly skipped, 0 certainly not, 0.5 unsure
    alignas(64) int64_t first_e[CB], first_sure[CB];  // 64-bit lanes like the doubles: one vector width
    result[0] = -1;
    result[1] = 0;
    for (int64_t r = 0; r < nrows; ++r) {
        const int64_t row = row0 + r;
        for (int64_t cb = 0; cb < ncols; cb += CB) {
            const int n = (int)((ncols - cb) < CB ? (ncols - cb) : CB);
            const int64_t cstart = col0 + cb;
            for (int c = 0; c < n; ++c) { first_e[c] = NONE; first_sure[c] = 0; }
            int64_t e = 0;
            for (int64_t t = 0; t < T; ++t) {
                const double toff = (double)t * thickstep;
                for (int64_t ss = 0; ss < os; ++ss) {
                    const double Sdet = ((double)(row * os) + ((double)ss + 0.5)) * sub;
                    const double bx = Sdet * sx_, by = Sdet * sy_, bz = Sdet * sz_;
                    for (int64_t sf = 0; sf < os; ++sf) {
                        const double fo = (double)sf + 0.5;
                        if (curved)  // positions on the sphere first (a loop of its own keeps the flat one vectorised)
                            tb_curved_block(dx, dy, dz, n, cstart, os, fo, bx, by, bz, toff, dp);
#pragma omp simd
                        for (int c = 0; c < n; ++c) {
                            const double Fdet = ((double)((cstart + c) * os) + fo) * sub;
                            const double px = curved ? dx[c] : tb_flat_coordinate(Fdet, fx, bx, toff, ox, p0x);
                            const double py = curved ? dy[c] : tb_flat_coordinate(Fdet, fy, by, toff, oy, p0y);
                            const double pz = curved ? dz[c] : tb_flat_coordinate(Fdet, fz, bz, toff, oz, p0z);
                            const double inv = 1.0 / std::sqrt(px * px + py * py + pz * pz);
                            dx[c] = px * inv; dy[c] = py * inv; dz[c] = pz * inv;
                        }
                        for (int64_t s = 0; s < S; ++s) {
                            const double* sp = src + 10 * s;
                            const double ix = sp[0], iy = sp[1], iz = sp[2], il = sp[3];
#pragma omp simd
                            for (int c = 0; c < n; ++c) {
                                const double X = (dx[c] - ix) * il, Y = (dy[c] - iy) * il, Z = (dz[c] - iz) * il;
                                qx[c] = X; qy[c] = Y; qz[c] = Z;
                                double sk = 0.0;
                                if (dmin_on) {
                                    const double stol = 0.5 * std::sqrt(X * X + Y * Y + Z * Z);
                                    const double lim = 0.5 / (stol > 0.0 ? stol : 1.0);
                                    const bool yes = (stol > 0.0) && (dmin > lim * (1.0 + 1e-9));
                                    const bool no = !(stol > 0.0) || (dmin < lim * (1.0 - 1e-9));
                                    sk = yes ? 1.0 : (no ? 0.0 : 0.5);
                                }
                                dskip[c] = sk;
                            }
                            for (int64_t pm = 0; pm < PM; ++pm, ++e) {
                                const double* L = lattice + 9 * pm;
                                const double a0 = L[0], a1 = L[1], a2 = L[2];
                                const double b0 = L[3], b1 = L[4], b2 = L[5];
                                const double e0 = L[6], e1 = L[7], e2 = L[8];
#pragma omp simd
                                for (int c = 0; c < n; ++c) {
                                    const double X = qx[c], Y = qy[c], Z = qz[c];
                                    const double h = tb_index(X, Y, Z, a0, a1, a2);
                                    const double k = tb_index(X, Y, Z, b0, b1, b2);
                                    const double l = tb_index(X, Y, Z, e0, e1, e2);
                                    // C: (h-hmin+3) > h_range || h-2 < hmin (and k, l): out where a gap is < 0
                                    // (NaN indices are caught below; a plain min keeps the loop vectorised)
                                    const double g = min2(min2(min2((h - 2.0) - hmin, hr - (h - hmin + 3.0)),
                                                               min2((k - 2.0) - kmin, kr - (k - kmin + 3.0))),
                                                          min2((l - 2.0) - lmin, lr - (l - lmin + 3.0)));
                                    const bool nan = (h != h) | (k != k) | (l != l);
                                    const bool in_sure = !nan & (g > eps);
                                    const bool out_sure = !nan & (g < -eps);
                                    bool fl_zero = n_zero, fl_nonzero = !n_zero;
#if TB_SHAPE == 1
                                    {
                                        const double fh = h - tb_nearest(h), fk = k - tb_nearest(k);
                                        const double fl = l - tb_nearest(l);
                                        const double hrad = fh * fh * na * na + fk * fk * nb * nb + fl * fl * nc * nc;
                                        const double x = 3.14159265358979323846 * std::sqrt(hrad * fudge);
                                        const double xs = x == 0.0 ? 1.0 : x;
                                        const double f = std::sin(xs) / xs - std::cos(xs);
                                        fl_zero = n_zero;
                                        fl_nonzero = !n_zero & ((x == 0.0) | (std::fabs(f) > 1e-4 * (1.0 + x)));
                                    }
#elif TB_SHAPE >= 2
                                    {
                                        const double dh = h - tb_nearest(h), dk = k - tb_nearest(k);
                                        const double dl = l - tb_nearest(l);
                                        const double u = dh * A[0] + dk * A[3] + dl * A[6];
                                        const double v = dh * A[1] + dk * A[4] + dl * A[7];
                                        const double w = dh * A[2] + dk * A[5] + dl * A[8];
                                        const double rad = (u * u + v * v + w * w) * N2prod;
#if TB_SHAPE == 2
                                        const double lg = -(rad / TB_GAUSS_WIDTH * fudge) + ln_n;
                                        fl_zero = lg < ln_tiny - 2.0;
                                        fl_nonzero = lg > ln_tiny + 2.0;
#else
                                        const double vr = rad * fudge;
                                        fl_zero = n_zero | (vr > TB_TOPHAT_LIMIT * (1.0 + 1e-5));
                                        fl_nonzero = !n_zero & (vr < TB_TOPHAT_LIMIT * (1.0 - 1e-5));
#endif
                                    }
#endif
                                    const bool skip_sure = (dskip[c] == 1.0) | (fl_matters & fl_zero);
                                    const bool noskip_sure = (dskip[c] == 0.0) & (!fl_matters | fl_nonzero);
                                    const bool flag = !(in_sure | skip_sure);
                                    const bool take = flag & (first_e[c] == NONE);
                                    first_sure[c] = take ? (int64_t)(out_sure & noskip_sure) : first_sure[c];
                                    first_e[c] = take ? e : first_e[c];
                                }
                            }
                        }
                    }
                }
            }
            const uint8_t* mrow = mask != nullptr ? mask + row * fpixels + cstart : nullptr;
            for (int c = 0; c < n; ++c) {
                if (first_e[c] != NONE && (mrow == nullptr || mrow[c] != 0)) {
                    result[0] = (row * fpixels + cstart + c) * E + first_e[c];
                    result[1] = first_sure[c];
                    return 0;
                }
            }
        }
    }
    return 0;
}
#endif

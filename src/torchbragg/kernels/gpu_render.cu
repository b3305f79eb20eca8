// torchbragg GPU render kernel: one thread per pixel.
//
// Compiled at run time by torchbragg.kernels.gpu: with NVRTC for the GPU (no nvcc or host compiler
// needed; kernel_math.h goes in NVRTC's header list), or as plain C++ for the host
// (``tb_render_host``), which runs the very same per-pixel function over the pixels one after
// another so that the test suite checks this file's physics on machines without a GPU. Variants:
// -DTB_REAL=float|double -DTB_DOUBLE=0|1 -DTB_SHAPE=0..3 (square, round, gauss, tophat)
// -DTB_TABLE=0|1 -DTB_COUNT=0|1 -DTB_INTERP=0|1 -DTB_OVER=0..2 (-oversample_thick/_polar/_omega:
// 1 C's running product, 2 per-term weighting), and the parameter indices -DD_*=, -DI_*= of
// torchbragg.kernels.packing.
//
// One evaluation's physics is kernel_math.h's, the CPU kernel's too: geometry, scattering vector
// and h = a.q in float64, lattice factor and structure factor in TB_REAL, sums in float64, in C's
// loop order (thickness, slow subpixel, fast subpixel, source, phi, mosaic).

#ifdef __CUDACC_RTC__
#define TB_HD __device__ __forceinline__
typedef long long i64_t;
typedef unsigned int u32_t;
typedef unsigned char u8_t;
#define TB_SIGNBIT(x) signbit(x)
#else
#include <math.h>
#include <stdint.h>
#define TB_HD static inline
typedef int64_t i64_t;
typedef uint32_t u32_t;
typedef uint8_t u8_t;
#define TB_SIGNBIT(x) std::signbit(x)
#include <cmath>
#endif
#define TB_EXP exp
#define TB_INDEX i64_t

typedef TB_REAL real;
#if TB_INTERP
typedef double tb_table_t;  // interpolation reads 64 entries a lookup: the table comes widened already
#else
typedef real tb_table_t;
#endif

#include "kernel_math.h"

// What one pixel's evaluations give: the image value (before the mask), the solid angle of its
// first subpixel, and the fallback counts (evaluations that used default_F, and those of them
// outside the table's box).
struct TbPixel {
    double value;
    double omega;
    u32_t n_default;
    u32_t n_outside;
};

TB_HD TbPixel tb_pixel(const double* __restrict__ dp, const i64_t* __restrict__ ip,
                       const double* __restrict__ lattice, const double* __restrict__ src,
                       const tb_table_t* __restrict__ table, i64_t row, i64_t col) {
    const i64_t os = ip[I_oversample], T = ip[I_T], S = ip[I_S], PM = ip[I_P] * ip[I_M];
    const bool point_pixel = ip[I_point_pixel] != 0, nopolar = ip[I_nopolar] != 0;
    const bool thick_on = ip[I_thick_on] != 0, dmin_on = ip[I_dmin_on] != 0, water = ip[I_water] != 0;
    const double sub = dp[D_subpixel], pix = dp[D_pixel], close = dp[D_close];
    const double fx = dp[D_fdet + 0], fy = dp[D_fdet + 1], fz = dp[D_fdet + 2];
    const double sx = dp[D_sdet + 0], sy = dp[D_sdet + 1], sz = dp[D_sdet + 2];
    const double ox = dp[D_odet + 0], oy = dp[D_odet + 1], oz = dp[D_odet + 2];
    const double p0x = dp[D_pix0 + 0], p0y = dp[D_pix0 + 1], p0z = dp[D_pix0 + 2];
    const double thickstep = dp[D_thickstep], mu = dp[D_mu], dmin = dp[D_dmin], kahn = dp[D_kahn];
    const real na = (real)dp[D_N + 0], nb = (real)dp[D_N + 1], nc = (real)dp[D_N + 2];
    const bool na_even = ((i64_t)dp[D_N + 0] - 1) % 2 != 0;
    const bool nb_even = ((i64_t)dp[D_N + 1] - 1) % 2 != 0;
    const bool nc_even = ((i64_t)dp[D_N + 2] - 1) % 2 != 0;
    const real fudge = (real)dp[D_fudge];
    (void)na_even; (void)nb_even; (void)nc_even; (void)fudge; (void)water; (void)table;
#if TB_TABLE
    const TbBox box = tb_box(ip);
    const double lo[3] = {box.hmin, box.kmin, box.lmin};
    (void)lo;
#else
    const real default_F = (real)dp[D_default_F];
#endif

    double acc = 0.0, om_first = 0.0, cap_last = 1.0, pol_first = 0.0;
    bool found = false;
#if TB_OVER
    // the -oversample_* factors per evaluation: fsub per subpixel (capture, omega), fpol per (subpixel,
    // source) (times polarisation); fsum their sum (TB_OVER 2), om_sum the subpixels' solid angles
    const bool ov_thick = ip[I_ov_thick] != 0, ov_polar = ip[I_ov_polar] != 0, ov_omega = ip[I_ov_omega] != 0;
    double fsum = 0.0, om_sum = 0.0;
    if (TB_OVER == 1)
        acc = dp[D_I_bg];  // C's running product starts from the background
#else
    const bool ov_thick = false, ov_polar = false;
#endif
    u32_t n_default = 0, n_outside = 0;
    for (i64_t t = 0; t < T; ++t) {
        const double toff = (double)t * thickstep;
        for (i64_t ss = 0; ss < os; ++ss) {
            const double Sdet = ((double)(row * os) + ((double)ss + 0.5)) * sub;
            for (i64_t sf = 0; sf < os; ++sf) {
                const double Fdet = ((double)(col * os) + ((double)sf + 0.5)) * sub;
                double px = tb_flat_coordinate(Fdet, fx, Sdet * sx, toff, ox, p0x);
                double py = tb_flat_coordinate(Fdet, fy, Sdet * sy, toff, oy, p0y);
                double pz = tb_flat_coordinate(Fdet, fz, Sdet * sz, toff, oz, p0z);
                if (ip[I_curved] != 0) {  // -curved_det
                    double v[3] = {px, py, pz};
                    tb_curve(v, dp);
                    px = v[0]; py = v[1]; pz = v[2];
                }
                const double air = sqrt(px * px + py * py + pz * pz);
                const double inv = 1.0 / air;
                const double dx = px * inv, dy = py * inv, dz = pz * inv;
                const double om = tb_solid_angle(air, pix, close, point_pixel);
                if (t == 0 && ss == 0 && sf == 0)  // C applies the first subpixel's solid angle
                    om_first = om;
                const bool last_cap = t == T - 1 && ss == 0 && sf == 0;  // and the last layer's capture
                double cap = 1.0;
                if (thick_on && (last_cap || ov_thick)) {
                    const double parallax = dx * ox + dy * oy + dz * oz;
                    cap = tb_capture((double)t, thickstep, mu, parallax);
                    if (last_cap)
                        cap_last = cap;
                }
#if TB_OVER
                om_sum += om;
                const double fsub = (ov_omega ? om : 1.0) * (ov_thick ? cap : 1.0);
#endif
                for (i64_t s = 0; s < S; ++s) {
                    const double* sp = src + 10 * s;
                    const double ix = sp[0], iy = sp[1], iz = sp[2], il = sp[3];
                    const double X = (dx - ix) * il, Y = (dy - iy) * il, Z = (dz - iz) * il;
                    const bool dskip = dmin_on && tb_dmin_skip(X, Y, Z, dmin);
                    double polar = 1.0;
                    if ((!found && !dskip) || ov_polar) {
                        // C applies the polarisation of the first (subpixel, source) that -dmin does not skip
                        polar = tb_polar(dx, dy, dz, sp, kahn, nopolar);
                        if (!found && !dskip) {
                            pol_first = polar;
                            found = true;
                        }
                    }
#if TB_OVER
                    const double fpol = ov_polar ? fsub * polar : fsub;
#endif
                    for (i64_t pm = 0; pm < PM; ++pm) {
                        const double* L = lattice + 9 * pm;
                        const double h = tb_index(X, Y, Z, L[0], L[1], L[2]);
                        const double k = tb_index(X, Y, Z, L[3], L[4], L[5]);
                        const double l = tb_index(X, Y, Z, L[6], L[7], L[8]);
                        const double h0 = tb_nearest(h), k0 = tb_nearest(k), l0 = tb_nearest(l);
                        const real Fl = tb_lattice_factor(h, k, l, h0, k0, l0, na, nb, nc, na_even, nb_even, nc_even,
                                                          fudge, dp);
                        // a zero lattice factor skips the lookup (C); a square crystal never does (see cpu_render.cpp)
                        const bool skipped = dskip || (!water && TB_SHAPE != 0 && Fl == (real)0);
                        real Fc;
                        bool inside = false;
#if TB_TABLE
                        Fc = tb_lookup(table, box, h0, k0, l0, inside);
#if TB_INTERP
                        if (!skipped)  // tricubic Lagrange interpolation (kernel_math.h), where C interpolates
                            Fc = (real)tb_tricubic(table, h, k, l, lo, box.nh, box.nk, box.nl);
#endif
#else
                        Fc = default_F;
#endif
#if TB_COUNT && !TB_INTERP
                        tb_count_fallback(skipped, Fc, inside, n_default, n_outside);
#endif
                        (void)inside;
#if TB_OVER
                        tb_accumulate(acc, fsum, tb_intensity(Fc, Fl, skipped), skipped, fpol);
#else
                        double no_fsum = 0.0;
                        tb_accumulate(acc, no_fsum, tb_intensity(Fc, Fl, skipped), skipped, 1.0);
#endif
                    }
                }
            }
        }
    }
    TbPixel out;
    const double nsub = (double)(T * os * os);
#if TB_OVER
    out.value = tb_pixel_value(acc, fsum, nsub, (double)(S * PM), dp[D_I_bg], dp[D_scale], cap_last, pol_first,
                               om_first, ov_thick, ov_polar, ov_omega);
    out.omega = ov_omega ? om_sum : nsub * om_first;
#else
    out.value = tb_pixel_value(acc, 0.0, nsub, (double)(S * PM), dp[D_I_bg], dp[D_scale], cap_last, pol_first,
                               om_first, false, false, false);
    out.omega = nsub * om_first;
#endif
    out.n_default = n_default;
    out.n_outside = n_outside;
    return out;
}

// Store one pixel: the image value (0 where masked), its solid-angle sum, and with TB_COUNT its
// fallback count (int8/16/32 by ip[I_count_bytes]) and dominant reason: 1 without a table; with
// one, 3 (unlisted) only when it outnumbers 2 (outside the box); 0 for none.
TB_HD void tb_store(const double* dp, const i64_t* ip, const double* lattice, const double* src,
                    const tb_table_t* table, const u8_t* mask, i64_t row0, i64_t col0, i64_t ncols, i64_t r, i64_t c,
                    real* image, i64_t image_stride, void* counts, u8_t* reasons, i64_t fb_stride, double* omega) {
    const i64_t row = row0 + r, col = col0 + c;
    const bool active = mask == 0 || mask[row * ip[I_fpixels] + col] != 0;
    TbPixel px;
    px.value = 0.0; px.omega = 0.0; px.n_default = 0; px.n_outside = 0;
    if (active)
        px = tb_pixel(dp, ip, lattice, src, table, row, col);
    image[r * image_stride + c] = (real)px.value;
    omega[r * ncols + c] = px.omega;
#if TB_COUNT
    const u32_t tot = tb_fallback_total(px.n_default);
    const i64_t at = r * fb_stride + c;
    const i64_t cb = ip[I_count_bytes];
    if (cb == 1)
        ((signed char*)counts)[at] = (signed char)tot;
    else if (cb == 2)
        ((short*)counts)[at] = (short)tot;
    else
        ((int*)counts)[at] = (int)tot;
    reasons[at] = tb_dominant_reason(tot, px.n_outside);
#else
    (void)counts; (void)reasons; (void)fb_stride;
#endif
}

#ifdef __CUDACC_RTC__
// One thread per pixel of the block rows row0.. x columns col0.. (pixel index = r * ncols + c).
extern "C" __global__ void tb_render(const double* dp, const i64_t* ip, const double* lattice, const double* src,
                                     const tb_table_t* table, const u8_t* mask, i64_t row0, i64_t nrows, i64_t col0, i64_t ncols,
                                     real* image, i64_t image_stride, void* counts, u8_t* reasons, i64_t fb_stride,
                                     double* omega) {
    const i64_t p = (i64_t)blockIdx.x * (i64_t)blockDim.x + (i64_t)threadIdx.x;
    if (p >= nrows * ncols)
        return;
    const i64_t r = p / ncols, c = p - (p / ncols) * ncols;
    tb_store(dp, ip, lattice, src, table, mask, row0, col0, ncols, r, c, image, image_stride, counts, reasons,
             fb_stride, omega);
}
#else
// The same pixels, one after another on the host: what the GPU threads compute, for testing.
extern "C" int tb_render_host(const double* dp, const i64_t* ip, const double* lattice, const double* src,
                              const tb_table_t* table, const u8_t* mask, i64_t row0, i64_t nrows, i64_t col0, i64_t ncols,
                              real* image, i64_t image_stride, void* counts, u8_t* reasons, i64_t fb_stride,
                              double* omega) {
    for (i64_t p = 0; p < nrows * ncols; ++p) {
        const i64_t r = p / ncols, c = p - (p / ncols) * ncols;
        tb_store(dp, ip, lattice, src, table, mask, row0, col0, ncols, r, c, image, image_stride, counts,
                 reasons, fb_stride, omega);
    }
    return 0;
}
#endif

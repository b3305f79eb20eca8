// torchbragg's CPU adjoint kernel: the backward pass of a render, vectorised across columns like the
// render kernel (cpu_render.cpp).
//
// Given g, the gradient of a scalar with respect to each pixel of the image, tb_adjoint adds to g_dp,
// g_lattice, g_src and g_table the gradient of sum(g * image) with respect to the packed parameters
// (torchbragg.kernels.packing): the detector vectors fdet, sdet, odet, pix0, close, N, default_F and
// a_star in g_dp; the real-space cell vectors per phi step and mosaic domain in g_lattice; per source the
// incident direction, 1/lambda and the polarisation frame B, E in g_src; per table entry (the extra last
// one is default_F outside the box) in g_table. Everything runs in float64 (TB_REAL=double): the
// exact derivative of the render's arithmetic, whatever the render dtype. Compiled by
// torchbragg.kernels.cpu_adjoint with the render kernel's switches for TB_SHAPE and TB_TABLE; the
// variants with -curved_det, interpolation or -oversample_* factors are the eager kernel's (autograd).
//
// One evaluation's physics is kernel_math.h's; the derivatives follow it term by term:
//   pixel value v = (sum_e I_e + I_bg) * scale * capture_last * polar_first * omega_first,
//   I_e = F_cell^2 F_latt^2, F_latt of h = a . (d - i) / lambda, d = p / |p|,
//   p = Fdet fdet + Sdet sdet + toff odet + pix0,
// so each pixel first needs its three factors (computed with its first subpixel), then every evaluation's adjoint weighted by
// W = g * scale * capture * polar * omega, then the factors' own adjoints once the sum is known.
#include "cpu_kernel.h"

typedef double tb_table_t;

#include "kernel_math.h"

#if !TB_DOUBLE || TB_INTERP || TB_OVER || TB_COUNT
#error "the adjoint kernel is built in double, without interpolation, -oversample_* factors or counts"
#endif

#define TB_PI 3.14159265358979323846

// tb_sincg(f, h0, n, n_even) with its derivatives: d/df (slope), pi (n cos(pi n f) - sincg cos(pi f)) /
// sin(pi f), by its Taylor series where |pi n f| < 0.03 (the difference cancels there; both are within
// about 1e-12 of the exact value at the switch), and d/dn (dn),
// pi f cos(pi n f) / sin(pi f); all with tb_sincg's sign
TB_HD double tb_sincg_and_slope(double f, double h0, double n, bool n_even, double& slope, double& dn) {
    const double x = TB_PI * f, n2 = n * n;
    const double x2 = x * x;
    const double series = TB_PI * n * x * (-(n2 - 1.0) / 3.0 + (3.0 * n2 * n2 - 10.0 * n2 + 7.0) * x2 / 90.0
                                           - (3.0 * n2 * n2 * n2 - 21.0 * n2 * n2 + 49.0 * n2 - 31.0) * x2 * x2 / 2520.0);
    const double sf = tb_sin_poly(f), cf = tb_cos_poly(f);
    const double inv = 1.0 / (sf == 0.0 ? 1.0 : sf);
    // sin and cos of pi n f from one reduction by the nearest integer k (tb_sinpi's, sign (-1)^k)
    const double y = n * f, k = rint(y), kh = k * 0.5;
    const double sk = 1.0 - 4.0 * (kh - floor(kh));
    const double snf = sk * tb_sin_poly(y - k), cnf = sk * tb_cos_poly(y - k);
    const double v = f == 0.0 ? n : snf * inv;
    const double direct = TB_PI * (n * cnf - v * cf) * inv;
    const double half = h0 * 0.5;
    const double sign = (n_even && (half - floor(half)) != 0.0) ? -1.0 : 1.0;
    slope = sign * (std::fabs(n * x) < 3e-2 ? series : direct);
    dn = sign * (f == 0.0 ? 1.0 : x * cnf * inv);  // d/dn: pi f cos(pi n f) / sin(pi f)
    return sign * v;
}

// d/dhrad of tb_round_factor(hrad, fudge, nprod): nprod 0.7236 s3'(x) dx/dhrad with s3 = 3 (sin x - x cos x)
// / x^3, x = pi sqrt(hrad fudge), dx/dhrad = pi^2 fudge / (2 x); s3'(x) / x by its series below x = 0.2
TB_HD double tb_round_slope(double hrad, double fudge, double nprod) {
    const double y = std::sqrt(hrad * fudge), x = TB_PI * y;
    const double xs = x == 0.0 ? 1.0 : x, x2 = xs * xs;
    const double s = tb_sinpi(y), c = tb_cospi(y);
    const double direct = 3.0 * (x2 * s - 3.0 * s + 3.0 * xs * c) / (x2 * x2 * xs);
    const double z = x * x;
    const double series = -0.2 + z / 70.0 - z * z / 2520.0 + z * z * z / 166320.0;
    return nprod * 0.723601254558268 * (x < 0.2 ? series : direct) * TB_PI * TB_PI * fudge * 0.5;
}

// the adjoint of tb_polar: g times its gradient added to gd (the diffracted direction) and gsp (the
// source's incident direction 0..2, B 4..6, E 7..9); the factor is constant along the beam (r2 = 0)
TB_HD void tb_polar_adjoint(const double* d, const double* sp, double kahn, double g, double* gd, double* gsp) {
    const double cos2t = d[0] * sp[0] + d[1] * sp[1] + d[2] * sp[2];
    const double c2 = cos2t * cos2t, s2 = 1.0 - c2;
    const double yb = d[0] * sp[4] + d[1] * sp[5] + d[2] * sp[6];
    const double xe = d[0] * sp[7] + d[1] * sp[8] + d[2] * sp[9];
    const double r2 = xe * xe + yb * yb;
    const double cos2psi = r2 > 0.0 ? (xe * xe - yb * yb) / r2 : 1.0;
    const double g_cos2t = g * 0.5 * (1.0 + kahn * cos2psi) * 2.0 * cos2t;
    const double g_psi = -g * 0.5 * kahn * s2;
    const double r4 = r2 > 0.0 ? r2 * r2 : 1.0;
    const double gxe = r2 > 0.0 ? g_psi * 4.0 * xe * yb * yb / r4 : 0.0;
    const double gyb = r2 > 0.0 ? -g_psi * 4.0 * yb * xe * xe / r4 : 0.0;
    for (int i = 0; i < 3; ++i) {
        gd[i] += g_cos2t * sp[i] + gyb * sp[4 + i] + gxe * sp[7 + i];
        gsp[i] += g_cos2t * d[i];
        gsp[4 + i] += gyb * d[i];
        gsp[7 + i] += gxe * d[i];
    }
}

// What one evaluation's adjoint needs besides its scattering vector and cell vectors
struct TbLattice {
    double na, nb, nc, fudge, N2prod, default_F;
    bool na_even, nb_even, nc_even, water;
    const double* A;   // the unrotated reciprocal vectors a*, b*, c* (rows)
    const double* dp;  // the packed parameters
#if TB_TABLE
    TbBox box;
#endif
};

// One evaluation's intensity I at the scattering vector (X, Y, Z) with cell vectors L (rows a, b, c) and
// the adjoint of W * I: with respect to the fractional h, k, l (gh, gk, gl), F_cell (gFc), Na, Nb, Nc (gn*)
// and, for gauss spots, a* (gA times the outer product of (u, v, w) and the fractions); skipped (-dmin,
// dskip, or a zero lattice factor without water) evaluations give 0. idx: the table entry read.
struct TbEvaluation {
    double I, gh, gk, gl, gFc, gn0, gn1, gn2, gA, u, v, w, fh, fk, fl;
    int idx;
};

TB_HD TbEvaluation tb_evaluation_adjoint(double X, double Y, double Z, const double* L, double W, bool dskip,
                                         const TbLattice& lat, const tb_table_t* table) {
    TbEvaluation e;
    const double h = tb_index(X, Y, Z, L[0], L[1], L[2]);
    const double k = tb_index(X, Y, Z, L[3], L[4], L[5]);
    const double l = tb_index(X, Y, Z, L[6], L[7], L[8]);
    const double h0 = tb_nearest(h), k0 = tb_nearest(k), l0 = tb_nearest(l);
    const double fh = h - h0, fk = k - k0, fl = l - l0;
    const double na = lat.na, nb = lat.nb, nc = lat.nc;
    // the lattice factor; d Fl / d h, k, l and d Fl / d Na, Nb, Nc
    double Fl, gh, gk, gl, ga_n, gb_n, gc_n, gr = 0.0, u = 0.0, v = 0.0, w = 0.0;
#if TB_SHAPE == 0
    double dh, dk, dl, mh, mk, ml;
    const double sh = tb_sincg_and_slope(fh, h0, na, lat.na_even, dh, mh);
    const double sk = tb_sincg_and_slope(fk, k0, nb, lat.nb_even, dk, mk);
    const double sl = tb_sincg_and_slope(fl, l0, nc, lat.nc_even, dl, ml);
    Fl = sh * sk * sl;
    gh = dh * sk * sl; gk = sh * dk * sl; gl = sh * sk * dl;
    ga_n = mh * sk * sl; gb_n = sh * mk * sl; gc_n = sh * sk * ml;
#elif TB_SHAPE == 1
    const double hrad = fh * fh * na * na + fk * fk * nb * nb + fl * fl * nc * nc;
    Fl = tb_round_factor(hrad, lat.fudge, na * nb * nc);
    gr = tb_round_slope(hrad, lat.fudge, na * nb * nc);
    gh = gr * 2.0 * fh * na * na; gk = gr * 2.0 * fk * nb * nb; gl = gr * 2.0 * fl * nc * nc;
    ga_n = Fl / na + gr * 2.0 * fh * fh * na;
    gb_n = Fl / nb + gr * 2.0 * fk * fk * nb;
    gc_n = Fl / nc + gr * 2.0 * fl * fl * nc;
    gr = 0.0;
#else
    const double* A = lat.A;
    Fl = tb_lattice_factor(h, k, l, h0, k0, l0, na, nb, nc, lat.na_even, lat.nb_even, lat.nc_even, lat.fudge,
                           lat.dp);
    u = fh * A[0] + fk * A[3] + fl * A[6];
    v = fh * A[1] + fk * A[4] + fl * A[7];
    w = fh * A[2] + fk * A[5] + fl * A[8];
#if TB_SHAPE == 2
    gr = -Fl * lat.fudge / TB_GAUSS_WIDTH * 2.0 * lat.N2prod;  // d Fl / d (u, v, w) divided by (u, v, w)
#endif
    // (tophat: flat inside and outside the spot, gr = 0)
    gh = gr * (u * A[0] + v * A[1] + w * A[2]);
    gk = gr * (u * A[3] + v * A[4] + w * A[5]);
    gl = gr * (u * A[6] + v * A[7] + w * A[8]);
    // through Nprod (Fl / N) and N2prod (gr (u^2 + v^2 + w^2) / 2 times 2 / N)
    const double qq = gr * (u * u + v * v + w * w);
    ga_n = Fl / na + qq / na; gb_n = Fl / nb + qq / nb; gc_n = Fl / nc + qq / nc;
#endif
    const bool skipped = dskip | (!lat.water & (TB_SHAPE != 0) & (Fl == 0.0));
#if TB_TABLE
    const TbBox& box = lat.box;
    bool inside;
    const double Fc = tb_lookup(table, box, h0, k0, l0, inside);
    const double didx = ((h0 - box.hmin) * box.nk + (k0 - box.kmin)) * box.nl + (l0 - box.lmin);
    e.idx = (int)(inside ? didx : box.size);
#else
    (void)table;
    const double Fc = lat.default_F;
    e.idx = 0;
#endif
    e.I = skipped ? 0.0 : Fc * Fc * Fl * Fl;
    const double wI = skipped ? 0.0 : W;
    const double gFl = wI * 2.0 * Fc * Fc * Fl;
    e.gFc = wI * 2.0 * Fc * Fl * Fl;
    e.gh = gh * gFl; e.gk = gk * gFl; e.gl = gl * gFl;
    e.gn0 = gFl * ga_n; e.gn1 = gFl * gb_n; e.gn2 = gFl * gc_n;
    e.gA = gFl * gr; e.u = u; e.v = v; e.w = w; e.fh = fh; e.fk = fk; e.fl = fl;
    return e;
}

// One subpixel's flat detector point p, its distance air and unit direction d
struct TbPoint {
    double d[3], air, Fdet, Sdet, toff;
};

TB_HD TbPoint tb_point(const double* dp, int64_t row, int64_t col, int64_t os, int64_t t, int64_t ss, int64_t sf) {
    TbPoint q;
    const double sub = dp[D_subpixel];
    q.Fdet = ((double)(col * os) + ((double)sf + 0.5)) * sub;
    q.Sdet = ((double)(row * os) + ((double)ss + 0.5)) * sub;
    q.toff = (double)t * dp[D_thickstep];
    double p[3];
    for (int i = 0; i < 3; ++i)
        p[i] = tb_flat_coordinate(q.Fdet, dp[D_fdet + i], q.Sdet * dp[D_sdet + i], q.toff, dp[D_odet + i],
                                  dp[D_pix0 + i]);
    q.air = std::sqrt(p[0] * p[0] + p[1] * p[1] + p[2] * p[2]);
    const double inv = 1.0 / q.air;  // the render's arithmetic: -dmin picks the same evaluations
    for (int i = 0; i < 3; ++i) q.d[i] = p[i] * inv;
    return q;
}

// a gradient gd of the direction d and g_air of the distance of point q, pushed back to the detector vectors
TB_HD void tb_push_point(const TbPoint& q, const double* gd, double g_air, double* g_dp) {
    const double dot = q.d[0] * gd[0] + q.d[1] * gd[1] + q.d[2] * gd[2];
    for (int i = 0; i < 3; ++i) {
        const double gp = (gd[i] - q.d[i] * dot) / q.air + g_air * q.d[i];
        g_dp[D_fdet + i] += gp * q.Fdet;
        g_dp[D_sdet + i] += gp * q.Sdet;
        g_dp[D_odet + i] += gp * q.toff;
        g_dp[D_pix0 + i] += gp;
    }
}

// The per-evaluation sums of the loops below (variables of the enclosing scope): the lattice gradient
// s* (d/dL = (gh, gk, gl) outer (X, Y, Z)), a* (u*, gauss only), default_F (without a table; with one the
// entry and its gradient are kept per column for the scatter), N (n*)
#if TB_SHAPE == 2
#define TB_A_STAR_SUMS(e)                                                                                     \
    u0 += e.gA * e.u * e.fh; u1 += e.gA * e.v * e.fh; u2 += e.gA * e.w * e.fh;                                \
    u3 += e.gA * e.u * e.fk; u4 += e.gA * e.v * e.fk; u5 += e.gA * e.w * e.fk;                                \
    u6 += e.gA * e.u * e.fl; u7 += e.gA * e.v * e.fl; u8 += e.gA * e.w * e.fl;
#else
#define TB_A_STAR_SUMS(e)
#endif
#if TB_TABLE
#define TB_F_SUMS(e) fidx[c] = e.idx; gfc[c] = e.gFc;
#else
#define TB_F_SUMS(e) sdef += e.gFc;
#endif
#define TB_EVALUATION_SUMS(e, X, Y, Z)                                                                        \
    TB_F_SUMS(e) TB_A_STAR_SUMS(e)                                                                            \
    n0 += e.gn0; n1 += e.gn1; n2 += e.gn2;                                                                    \
    s0 += e.gh * X; s1 += e.gh * Y; s2 += e.gh * Z;                                                           \
    s3 += e.gk * X; s4 += e.gk * Y; s5 += e.gk * Z;                                                           \
    s6 += e.gl * X; s7 += e.gl * Y; s8 += e.gl * Z;
// ... added to the outputs after a loop over the columns (pm: the phi step and domain)
#if TB_TABLE
#define TB_TABLE_SCATTER                                                                                      \
    if (g_table != nullptr)                                                                                   \
        for (int c = 0; c < n; ++c) g_table[fidx[c]] += gfc[c];
#else
#define TB_TABLE_SCATTER
#endif
#define TB_LATTICE_SUMS(pm)                                                                                   \
    {                                                                                                         \
        double* gL = g_lattice + 9 * (pm);                                                                    \
        gL[0] += s0; gL[1] += s1; gL[2] += s2; gL[3] += s3; gL[4] += s4;                                      \
        gL[5] += s5; gL[6] += s6; gL[7] += s7; gL[8] += s8;                                                   \
        double* gA = g_dp + D_a_star;                                                                         \
        gA[0] += u0; gA[1] += u1; gA[2] += u2; gA[3] += u3; gA[4] += u4;                                      \
        gA[5] += u5; gA[6] += u6; gA[7] += u7; gA[8] += u8;                                                   \
        g_default += sdef;                                                                                    \
        g_dp[D_N + 0] += n0; g_dp[D_N + 1] += n1; g_dp[D_N + 2] += n2;                                        \
        TB_TABLE_SCATTER                                                                                      \
    }

// The gradient of sum(g * image) over rows row0.. and columns col0..col0+ncols-1 (g at grad, row
// stride grad_stride, the block's first pixel first), added to g_dp [D_LEN], g_lattice [P*M*9],
// g_src [S*10] and, unless it is null, g_table [table entries + 1]; without a table default_F's gradient
// goes to g_dp[D_default_F]. The pixel (skip_row, skip_col) is left out (the caller differentiates the
// first pixel's phi = 0 quirk with the eager kernel); -1 for none.
extern "C" int tb_adjoint(const double* dp, const int64_t* ip, const double* lattice, const double* src,
                          const tb_table_t* table, const uint8_t* mask, int64_t row0, int64_t nrows, int64_t col0,
                          int64_t ncols, const double* grad, int64_t grad_stride, int64_t skip_row,
                          int64_t skip_col, double* g_dp, double* g_lattice, double* g_src, double* g_table) {
    const int64_t os = ip[I_oversample], T = ip[I_T], S = ip[I_S], P = ip[I_P], M = ip[I_M];
    const int64_t PM = P * M, fpixels = ip[I_fpixels];
    const bool point_pixel = ip[I_point_pixel] != 0, nopolar = ip[I_nopolar] != 0;
    const bool thick_on = ip[I_thick_on] != 0, dmin_on = ip[I_dmin_on] != 0, water = ip[I_water] != 0;
    if (ip[I_curved] != 0) return 1;
    const double sub = dp[D_subpixel], pix = dp[D_pixel], close = dp[D_close];
    const double fx = dp[D_fdet + 0], fy = dp[D_fdet + 1], fz = dp[D_fdet + 2];
    const double sx_ = dp[D_sdet + 0], sy_ = dp[D_sdet + 1], sz_ = dp[D_sdet + 2];
    const double ox = dp[D_odet + 0], oy = dp[D_odet + 1], oz = dp[D_odet + 2];
    const double p0x = dp[D_pix0 + 0], p0y = dp[D_pix0 + 1], p0z = dp[D_pix0 + 2];
    const double thickstep = dp[D_thickstep], mu = dp[D_mu], dmin = dp[D_dmin], kahn = dp[D_kahn];
    const double I_bg = dp[D_I_bg], scale = dp[D_scale];
    const double na = dp[D_N + 0], nb = dp[D_N + 1], nc = dp[D_N + 2];
    const bool na_even = ((int64_t)dp[D_N + 0] - 1) % 2 != 0;
    const bool nb_even = ((int64_t)dp[D_N + 1] - 1) % 2 != 0;
    const bool nc_even = ((int64_t)dp[D_N + 2] - 1) % 2 != 0;
    const double default_F = dp[D_default_F], fudge = dp[D_fudge];
    const double* A = dp + D_a_star;
    const double N2prod = dp[D_N2prod];
    (void)na; (void)nb; (void)nc; (void)na_even; (void)nb_even; (void)nc_even; (void)A; (void)N2prod;
    (void)table; (void)g_table; (void)default_F; (void)water;
    TbLattice lat;
    lat.na = na; lat.nb = nb; lat.nc = nc; lat.fudge = fudge; lat.N2prod = N2prod; lat.default_F = default_F;
    lat.na_even = na_even; lat.nb_even = nb_even; lat.nc_even = nc_even; lat.water = water; lat.A = A; lat.dp = dp;
#if TB_TABLE
    lat.box = tb_box(ip);
    alignas(64) int fidx[CB];
    alignas(64) double gfc[CB];
#endif
    double g_default = 0.0;

    alignas(64) double gv[CB], W[CB], acc[CB], om1[CB], cap1[CB], pol1[CB];
    alignas(64) int sel[CB];  // the (subpixel, source) of the first polarisation, -1 for none
    alignas(64) double dx[CB], dy[CB], dz[CB], air[CB], qx[CB], qy[CB], qz[CB], dsk[CB];
    alignas(64) double gdx[CB], gdy[CB], gdz[CB], gqx[CB], gqy[CB], gqz[CB];
    alignas(64) double d1x[CB], d1y[CB], d1z[CB], air1[CB];  // the first subpixel's direction and distance

    for (int64_t r = 0; r < nrows; ++r) {
        const int64_t row = row0 + r;
        const double* grow = grad + r * grad_stride;
        for (int64_t cb = 0; cb < ncols; cb += CB) {
            const int n = (int)((ncols - cb) < CB ? (ncols - cb) : CB);
            const int64_t cstart = col0 + cb;
            const uint8_t* mrow = mask != nullptr ? mask + row * fpixels + cstart : nullptr;
            bool any = false;
            for (int c = 0; c < n; ++c) {
                const bool active = (mrow == nullptr || mrow[c] != 0) && !(row == skip_row && cstart + c == skip_col);
                gv[c] = active ? grow[cb + c] : 0.0;
                any = any || gv[c] != 0.0;
            }
            if (!any) continue;
            // each pixel's factors: the solid angle of the first subpixel, the capture of the last layer's
            // first subpixel, the polarisation of the first (subpixel, source) -dmin keeps (without -dmin
            // the first: computed with the first subpixel below), and W = g scale capture polar omega
            const double Sdet0 = ((double)(row * os) + 0.5) * sub;
            for (int c = 0; c < n; ++c) {
                cap1[c] = 1.0;
                pol1[c] = 0.0;
                sel[c] = dmin_on ? -1 : 0;
                acc[c] = 0.0;
            }
            for (int c = 0; c < n && (thick_on || dmin_on); ++c) {
                if (gv[c] == 0.0) continue;
                const int64_t col = cstart + c;
                if (thick_on) {
                    const TbPoint ql = tb_point(dp, row, col, os, T - 1, 0, 0);
                    cap1[c] = tb_capture((double)(T - 1), thickstep, mu, ql.d[0] * ox + ql.d[1] * oy + ql.d[2] * oz);
                }
                int e = 0;
                for (int64_t t = 0; t < T && dmin_on && sel[c] < 0; ++t)
                    for (int64_t ss = 0; ss < os && sel[c] < 0; ++ss)
                        for (int64_t sf = 0; sf < os && sel[c] < 0; ++sf) {
                            const TbPoint q = tb_point(dp, row, col, os, t, ss, sf);
                            for (int64_t s = 0; s < S; ++s, ++e) {
                                const double* sp = src + 10 * s;
                                const double X = (q.d[0] - sp[0]) * sp[3], Y = (q.d[1] - sp[1]) * sp[3];
                                const double Z = (q.d[2] - sp[2]) * sp[3];
                                if (!tb_dmin_skip(X, Y, Z, dmin)) {
                                    sel[c] = e;
                                    pol1[c] = tb_polar(q.d[0], q.d[1], q.d[2], sp, kahn, nopolar);
                                    break;
                                }
                            }
                        }
            }
            for (int64_t t = 0; t < T; ++t) {
                const double toff = (double)t * thickstep;
                for (int64_t ss = 0; ss < os; ++ss) {
                    const double Sdet = ((double)(row * os) + ((double)ss + 0.5)) * sub;
                    const double bx = Sdet * sx_, by = Sdet * sy_, bz = Sdet * sz_;
                    for (int64_t sf = 0; sf < os; ++sf) {
                        const double fo = (double)sf + 0.5;
                        // the sums over the block's columns of this subpixel's gradients: lattice (s*), a* (u*),
                        // default_F, N (per phi step and domain), the source (hi*, hil), and the detector point
                        // (f* along fdet, q* plain)
                        double s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, s8 = 0;
                        double u0 = 0, u1 = 0, u2 = 0, u3 = 0, u4 = 0, u5 = 0, u6 = 0, u7 = 0, u8 = 0;
                        double sdef = 0, n0 = 0, n1 = 0, n2 = 0;
                        double f0 = 0, f1 = 0, f2 = 0, q0 = 0, q1 = 0, q2 = 0;
                        {
#pragma omp simd
                            for (int c = 0; c < n; ++c) {
                                const double Fdet = ((double)((cstart + c) * os) + fo) * sub;
                                const double px = tb_flat_coordinate(Fdet, fx, bx, toff, ox, p0x);
                                const double py = tb_flat_coordinate(Fdet, fy, by, toff, oy, p0y);
                                const double pz = tb_flat_coordinate(Fdet, fz, bz, toff, oz, p0z);
                                const double a = std::sqrt(px * px + py * py + pz * pz);
                                const double inv = 1.0 / a;
                                dx[c] = px * inv; dy[c] = py * inv; dz[c] = pz * inv; air[c] = a;
                                gdx[c] = 0.0; gdy[c] = 0.0; gdz[c] = 0.0;
                            }
                            if ((t | ss | sf) == 0) {
#pragma omp simd
                                for (int c = 0; c < n; ++c) {
                                    om1[c] = tb_solid_angle(air[c], pix, close, point_pixel);
                                    pol1[c] = dmin_on ? pol1[c] : tb_polar(dx[c], dy[c], dz[c], src, kahn, nopolar);
                                    W[c] = gv[c] * scale * cap1[c] * pol1[c] * om1[c];
                                    d1x[c] = dx[c]; d1y[c] = dy[c]; d1z[c] = dz[c]; air1[c] = air[c];
                                }
                            }
                            for (int64_t s = 0; s < S; ++s) {
                                const double* sp = src + 10 * s;
                                const double ix = sp[0], iy = sp[1], iz = sp[2], il = sp[3];
#pragma omp simd
                                for (int c = 0; c < n; ++c) {
                                    const double X = (dx[c] - ix) * il, Y = (dy[c] - iy) * il, Z = (dz[c] - iz) * il;
                                    qx[c] = X; qy[c] = Y; qz[c] = Z;
                                    dsk[c] = 0.0;
                                    gqx[c] = 0.0; gqy[c] = 0.0; gqz[c] = 0.0;
                                }
                                if (dmin_on)  // a loop of its own: its square root and division cost every evaluation
#pragma omp simd
                                    for (int c = 0; c < n; ++c) dsk[c] = tb_dmin_skip(qx[c], qy[c], qz[c], dmin) ? 1.0 : 0.0;
                                for (int64_t pm = 0; pm < PM; ++pm) {
                                    const double* L = lattice + 9 * pm;
                                    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = 0.0;
                                    u0 = u1 = u2 = u3 = u4 = u5 = u6 = u7 = u8 = 0.0;
                                    sdef = n0 = n1 = n2 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7, s8, u0, u1, u2, u3, u4, u5, u6, u7, u8, sdef, n0, n1, n2)
                                    for (int c = 0; c < n; ++c) {
                                        const double X = qx[c], Y = qy[c], Z = qz[c];
                                        const TbEvaluation e = tb_evaluation_adjoint(X, Y, Z, L, W[c], dsk[c] != 0.0, lat,
                                                                                     table);
                                        acc[c] += e.I;
                                        TB_EVALUATION_SUMS(e, X, Y, Z)
                                        gqx[c] += e.gh * L[0] + e.gk * L[3] + e.gl * L[6];
                                        gqy[c] += e.gh * L[1] + e.gk * L[4] + e.gl * L[7];
                                        gqz[c] += e.gh * L[2] + e.gk * L[5] + e.gl * L[8];
                                    }
                                    TB_LATTICE_SUMS(pm)
                                }
                                double hi0 = 0, hi1 = 0, hi2 = 0, hil = 0;
#pragma omp simd reduction(+ : hi0, hi1, hi2, hil)
                                for (int c = 0; c < n; ++c) {
                                    gdx[c] += gqx[c] * il; gdy[c] += gqy[c] * il; gdz[c] += gqz[c] * il;
                                    hi0 -= gqx[c] * il; hi1 -= gqy[c] * il; hi2 -= gqz[c] * il;
                                    hil += gqx[c] * (dx[c] - ix) + gqy[c] * (dy[c] - iy) + gqz[c] * (dz[c] - iz);
                                }
                                double* gs = g_src + 10 * s;
                                gs[0] += hi0; gs[1] += hi1; gs[2] += hi2; gs[3] += hil;
                            }
                            // d = p / |p|: back to p
#pragma omp simd reduction(+ : f0, f1, f2, q0, q1, q2)
                            for (int c = 0; c < n; ++c) {
                                const double Fdet = ((double)((cstart + c) * os) + fo) * sub;
                                const double dot = dx[c] * gdx[c] + dy[c] * gdy[c] + dz[c] * gdz[c];
                                const double inv = 1.0 / air[c];
                                const double gpx = (gdx[c] - dx[c] * dot) * inv, gpy = (gdy[c] - dy[c] * dot) * inv;
                                const double gpz = (gdz[c] - dz[c] * dot) * inv;
                                f0 += gpx * Fdet; f1 += gpy * Fdet; f2 += gpz * Fdet;
                                q0 += gpx; q1 += gpy; q2 += gpz;
                            }
                        }
                        // then to the detector vectors
                        g_dp[D_fdet + 0] += f0; g_dp[D_fdet + 1] += f1; g_dp[D_fdet + 2] += f2;
                        g_dp[D_sdet + 0] += q0 * Sdet; g_dp[D_sdet + 1] += q1 * Sdet; g_dp[D_sdet + 2] += q2 * Sdet;
                        g_dp[D_odet + 0] += q0 * toff; g_dp[D_odet + 1] += q1 * toff; g_dp[D_odet + 2] += q2 * toff;
                        g_dp[D_pix0 + 0] += q0; g_dp[D_pix0 + 1] += q1; g_dp[D_pix0 + 2] += q2;
                    }
                }
            }
            // post-pass: the factors' adjoints, now that each pixel's sum is known. The first subpixel's solid
            // angle and (where it is the first one -dmin keeps, sel 0) its polarisation with source 0:
            double f0 = 0, f1 = 0, f2 = 0, q0 = 0, q1 = 0, q2 = 0, gcl = 0;
            double i0 = 0, i1 = 0, i2 = 0, b0 = 0, b1 = 0, b2 = 0, e0 = 0, e1 = 0, e2 = 0;
            const double* sp0 = src;
#pragma omp simd reduction(+ : f0, f1, f2, q0, q1, q2, gcl, i0, i1, i2, b0, b1, b2, e0, e1, e2)
            for (int c = 0; c < n; ++c) {
                const double Fdet = ((double)((cstart + c) * os) + 0.5) * sub;
                const double inv = 1.0 / air1[c];
                const double d0 = d1x[c], d1 = d1y[c], d2 = d1z[c];
                const double base = gv[c] * (acc[c] + I_bg) * scale;
                const double om = om1[c];
                const double g_om = base * cap1[c] * pol1[c];
                const double g_pol = (sel[c] == 0 && !nopolar) ? base * cap1[c] * om : 0.0;
                // omega = pixel^2 close / air^3 (1 / air^2 for -point_pixel)
                const double g_air = g_om * (point_pixel ? -2.0 : -3.0) * om * inv;
                gcl += point_pixel ? 0.0 : g_om * om / close;
                // tb_polar's adjoint
                const double cos2t = d0 * sp0[0] + d1 * sp0[1] + d2 * sp0[2];
                const double s2 = 1.0 - cos2t * cos2t;
                const double yb = d0 * sp0[4] + d1 * sp0[5] + d2 * sp0[6];
                const double xe = d0 * sp0[7] + d1 * sp0[8] + d2 * sp0[9];
                const double r2 = xe * xe + yb * yb;
                const double cos2psi = r2 > 0.0 ? (xe * xe - yb * yb) / r2 : 1.0;
                const double g_c = g_pol * (1.0 + kahn * cos2psi) * cos2t;
                const double g_psi = -g_pol * 0.5 * kahn * s2;
                const double r4 = r2 > 0.0 ? r2 * r2 : 1.0;
                const double gxe = r2 > 0.0 ? g_psi * 4.0 * xe * yb * yb / r4 : 0.0;
                const double gyb = r2 > 0.0 ? -g_psi * 4.0 * yb * xe * xe / r4 : 0.0;
                const double gd0 = g_c * sp0[0] + gyb * sp0[4] + gxe * sp0[7];
                const double gd1 = g_c * sp0[1] + gyb * sp0[5] + gxe * sp0[8];
                const double gd2 = g_c * sp0[2] + gyb * sp0[6] + gxe * sp0[9];
                i0 += g_c * d0; i1 += g_c * d1; i2 += g_c * d2;
                b0 += gyb * d0; b1 += gyb * d1; b2 += gyb * d2;
                e0 += gxe * d0; e1 += gxe * d1; e2 += gxe * d2;
                const double dot = d0 * gd0 + d1 * gd1 + d2 * gd2;
                const double gp0 = (gd0 - d0 * dot) * inv + g_air * d0;
                const double gp1 = (gd1 - d1 * dot) * inv + g_air * d1;
                const double gp2 = (gd2 - d2 * dot) * inv + g_air * d2;
                f0 += gp0 * Fdet; f1 += gp1 * Fdet; f2 += gp2 * Fdet;
                q0 += gp0; q1 += gp1; q2 += gp2;
            }
            g_dp[D_fdet + 0] += f0; g_dp[D_fdet + 1] += f1; g_dp[D_fdet + 2] += f2;
            g_dp[D_sdet + 0] += q0 * Sdet0; g_dp[D_sdet + 1] += q1 * Sdet0; g_dp[D_sdet + 2] += q2 * Sdet0;
            g_dp[D_pix0 + 0] += q0; g_dp[D_pix0 + 1] += q1; g_dp[D_pix0 + 2] += q2;
            g_dp[D_close] += gcl;
            g_src[0] += i0; g_src[1] += i1; g_src[2] += i2;
            g_src[4] += b0; g_src[5] += b1; g_src[6] += b2;
            g_src[7] += e0; g_src[8] += e1; g_src[9] += e2;
            // then the polarisation of a later (subpixel, source) (-dmin) and the last layer's capture
            for (int c = 0; c < n && (thick_on || dmin_on); ++c) {
                if (gv[c] == 0.0) continue;
                const int64_t col = cstart + c;
                const double base = gv[c] * (acc[c] + I_bg) * scale;
                const double g_pol = base * cap1[c] * om1[c], g_cap = base * pol1[c] * om1[c];
                if (sel[c] > 0 && !nopolar) {
                    const int64_t s = sel[c] % S, sub_i = sel[c] / S;
                    const int64_t sf = sub_i % os, ss = (sub_i / os) % os, t = sub_i / (os * os);
                    const TbPoint q = tb_point(dp, row, col, os, t, ss, sf);
                    double gd[3] = {0.0, 0.0, 0.0};
                    tb_polar_adjoint(q.d, src + 10 * s, kahn, g_pol, gd, g_src + 10 * s);
                    tb_push_point(q, gd, 0.0, g_dp);
                }
                if (thick_on) {
                    const TbPoint q = tb_point(dp, row, col, os, T - 1, 0, 0);
                    const double par = q.d[0] * ox + q.d[1] * oy + q.d[2] * oz;
                    if (par > 0.0) {
                        const double a = thickstep * mu, t0 = (double)(T - 1) * a, t1 = (double)T * a;
                        const double slope = (std::exp(-t0 / par) * t0 - std::exp(-t1 / par) * t1) / (par * par);
                        const double gpar = g_cap * slope;
                        const double gd[3] = {gpar * ox, gpar * oy, gpar * oz};
                        for (int i = 0; i < 3; ++i) g_dp[D_odet + i] += gpar * q.d[i];
                        tb_push_point(q, gd, 0.0, g_dp);
                    }
                }
            }
        }
    }
    g_dp[D_default_F] += g_default;
    return 0;
}

//! torchvision's antialiased bilinear or bicubic resize (`F.resize(...,
//! antialias=True)` on a float tensor, then clamped and rounded to uint8)
//! of a window of an 8-bit RGB image, computed on the host without
//! libtorch: the same weights (a triangle, or Keys' cubic with a = -0.5,
//! as wide as the scale, normalized) in the same float
//! arithmetic and order as libtorch's separable CPU kernel, rows first,
//! then columns, each sum as the torch wheel's compiled kernel takes it
//! (see [`fused_from`]), so the pixels are libtorch's bit for bit, before
//! rounding too (checked against it in the tests). Only the kept pixels
//! are computed. It is several times faster per image, which is what
//! streaming workers and `predict` spend their time on.

use crate::choice::Choice;

/// One axis' taps: per kept output pixel (from the first kept one) the
/// first input pixel, how many, and the weights (`per` slots each).
struct Taps {
    first: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<f32>,
    per: usize,
    /// The most taps any output pixel has.
    widest: usize,
}

/// The resampling filter of a resize: torchvision's `InterpolationMode`
/// (`--interpolation`), bilinear unless said otherwise.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    #[default]
    Bilinear,
    Bicubic,
}

impl Choice for Filter {
    const ALL: &'static [Self] = &[Filter::Bilinear, Filter::Bicubic];
    fn name(self) -> &'static str {
        match self {
            Filter::Bilinear => "bilinear",
            Filter::Bicubic => "bicubic",
        }
    }
    fn help(self) -> &'static str {
        match self {
            Filter::Bilinear => "InterpolationMode.BILINEAR (torchvision's default)",
            Filter::Bicubic => "InterpolationMode.BICUBIC (Keys' cubic, a = -0.5, as PIL's)",
        }
    }
}

impl Filter {
    /// Half the filter's width at scale 1 (libtorch's `interp_size / 2`).
    fn reach(self) -> f32 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    /// libtorch's antialiasing `aa_filter` at distance `x` (in input
    /// pixels over the scale): the triangle in double precision as its
    /// literal `1.0` makes it, Keys' cubic (a = -0.5, as PIL's) in float
    /// with its multiply-adds fused as the compiled kernel's are (the
    /// weights are libtorch's bit for bit, checked in Python too).
    fn weight(self, x: f32) -> f32 {
        let x = x.abs();
        match self {
            Filter::Bilinear if x < 1.0 => (1.0 - x as f64) as f32,
            // ((a + 2)·x − (a + 3))·x·x + 1
            Filter::Bicubic if x < 1.0 => (1.5f32.mul_add(x, -2.5) * x).mul_add(x, 1.0),
            // ((a·x − 5a)·x + 8a)·x − 4a
            Filter::Bicubic if x < 2.0 => {
                (-0.5f32).mul_add(x, 2.5).mul_add(x, -4.0).mul_add(x, 2.0)
            }
            _ => 0.0,
        }
    }
}

/// libtorch's `_compute_indices_min_size_weights_aa`, input `len` pixels
/// to `out` pixels, for the output pixels `kept` only (an image's thin
/// side resized to thousands of times its length costs only what is kept).
fn taps(len: usize, out: usize, filter: Filter, kept: std::ops::Range<usize>) -> Taps {
    let scale = len as f32 / out as f32;
    let support: f32 = filter.reach() * if scale >= 1.0 { scale } else { 1.0 };
    let per = (support.ceil() as usize) * 2 + 1;
    let invscale = if scale >= 1.0 {
        (1.0f64 / scale as f64) as f32
    } else {
        1.0
    };
    let n = kept.len();
    let mut t = Taps {
        first: Vec::with_capacity(n),
        count: Vec::with_capacity(n),
        weights: vec![0.0; n * per],
        per,
        widest: 0,
    };
    for (k, i) in kept.enumerate() {
        let centre = (scale as f64 * (i as f64 + 0.5)) as f32;
        let first = (((centre - support) as f64 + 0.5) as i64).max(0);
        let end = (((centre + support) as f64 + 0.5) as i64).min(len as i64);
        let count = (end - first).clamp(0, per as i64) as usize;
        let w = &mut t.weights[k * per..(k + 1) * per];
        let mut total = 0.0f32;
        for (j, wj) in w.iter_mut().enumerate().take(count) {
            let x = ((((j as i64 + first) as f32 - centre) as f64 + 0.5) * invscale as f64) as f32;
            *wj = filter.weight(x);
            total += *wj;
        }
        if total != 0.0 {
            w.iter_mut().take(count).for_each(|wj| *wj /= total);
        }
        t.first.push(first as usize);
        t.count.push(count);
        t.widest = t.widest.max(count);
    }
    t
}

/// Zero pixels after a row, for [`row_pass`]'s padded taps.
const PAD: usize = 8;

/// An image's window in pixels: top, left, height, width.
pub type Window = (usize, usize, usize, usize);

/// One resize: the window `src` of an image to `out` (height, width), of
/// which only the window `keep` of the output is computed (a centre crop
/// after the resize costs no more than the crop), mirrored left-right when
/// `flip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resize {
    pub src: Window,
    pub out: (usize, usize),
    pub keep: Window,
    pub flip: bool,
    pub filter: Filter,
}

impl Resize {
    /// A whole image of `(height, width)` to `out`, all of it kept,
    /// bilinear.
    pub fn whole((h, w): (usize, usize), out: (usize, usize)) -> Resize {
        Resize {
            src: (0, 0, h, w),
            out,
            keep: (0, 0, out.0, out.1),
            flip: false,
            filter: Filter::Bilinear,
        }
    }

    /// The same resize with `filter`.
    pub fn with(self, filter: Filter) -> Resize {
        Resize { filter, ..self }
    }

    /// How many of the image's rows from the top it reads: the end of
    /// what its kept rows read in the window.
    pub fn rows_read(&self) -> usize {
        let (top, _, h, _) = self.src;
        let (ky, kh) = (self.keep.0, self.keep.2);
        let down = (h != self.out.0).then(|| taps(h, self.out.0, self.filter, ky..ky + kh));
        top + rows_read(down.as_ref(), ky, kh).1
    }

    /// The bytes of its `3 x h x w` result (`keep`'s size).
    pub fn bytes(&self) -> usize {
        3 * self.keep.2 * self.keep.3
    }
}

/// The window's rows (from its top, end exclusive) that the kept output
/// rows `ky..ky + kh` read, with `down` the kept rows' taps (None: not
/// resized).
fn rows_read(down: Option<&Taps>, ky: usize, kh: usize) -> (usize, usize) {
    match down {
        None => (ky, ky + kh),
        Some(t) => (
            t.first[0],
            (0..kh).map(|y| t.first[y] + t.count[y]).max().unwrap_or(0),
        ),
    }
}

/// `r` of `rgb` (interleaved, `width` pixels a row), rounded to uint8, as a
/// `3 x h x w` (CHW) buffer of `keep`'s size.
pub fn resize_window(rgb: &[u8], width: usize, r: &Resize) -> Vec<u8> {
    let mut planes = vec![0u8; r.bytes()];
    resize_window_into(rgb, width, r, &mut planes);
    planes
}

/// [`resize_window`] into `planes` ([`Resize::bytes`] of them).
pub fn resize_window_into(rgb: &[u8], width: usize, r: &Resize, planes: &mut [u8]) {
    let (kh, kw) = (r.keep.2, r.keep.3);
    let plane = kh * kw;
    resize_lines(rgb, width, r, |y, line| {
        let (red, rest) = planes.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        let at = y * kw..(y + 1) * kw;
        store(
            line,
            [&mut red[at.clone()], &mut g[at.clone()], &mut b[at]],
            r.flip,
        );
    });
}

/// The float pixels of `r` (not mirrored), handed to `emit` one kept
/// output row `y` at a time.
fn resize_lines(rgb: &[u8], width: usize, r: &Resize, mut emit: impl FnMut(usize, &[[f32; 4]])) {
    let Resize {
        src,
        out,
        keep,
        filter,
        ..
    } = *r;
    let (top, left, h, w) = src;
    let (ky, kx, kh, kw) = keep;
    let cols = (w != out.1).then(|| taps(w, out.1, filter, kx..kx + kw));
    let down = (h != out.0).then(|| taps(h, out.0, filter, ky..ky + kh));
    let (y_from, y_to) = rows_read(down.as_ref(), ky, kh);
    // Pixels as four floats (R, G, B and an unused lane), so that a
    // pixel's three sums are one vector operation; each lane's sum keeps
    // libtorch's order.
    let (mut pixels, mut rows, mut line) = SCRATCH.take();
    for (buf, n) in [
        (&mut pixels, w + PAD),
        (&mut rows, (y_to - y_from) * kw),
        (&mut line, kw),
    ] {
        if buf.len() < n {
            buf.resize(n, [0.0; 4]);
        }
    }
    // Zero pixels past the row's end, read by the padded taps of the
    // last output pixels.
    pixels[w..w + PAD].fill([0.0; 4]);
    for y in y_from..y_to {
        let start = ((top + y) * width + left) * 3;
        widen(&rgb[start..start + w * 3], &mut pixels[..w]);
        let dst = &mut rows[(y - y_from) * kw..(y - y_from + 1) * kw];
        row_pass(&pixels, dst, cols.as_ref(), kx);
    }
    for y in 0..kh {
        let line = match &down {
            None => &rows[(ky + y - y_from) * kw..(ky + y - y_from + 1) * kw],
            Some(t) => {
                let (f, n) = (t.first[y] - y_from, t.count[y]);
                let weights = &t.weights[y * t.per..y * t.per + n];
                column_pass(&rows[f * kw..(f + n) * kw], weights, &mut line[..kw]);
                &line[..kw]
            }
        };
        emit(y, line);
    }
    SCRATCH.set((pixels, rows, line));
}

/// Each thread's buffers, kept between images: a fresh buffer of this
/// size is fresh pages from the kernel, faulted in one by one. Every
/// element a resize reads it has written first.
type Buffers = (Vec<[f32; 4]>, Vec<[f32; 4]>, Vec<[f32; 4]>);

thread_local! {
    static SCRATCH: std::cell::Cell<Buffers> = const {
        std::cell::Cell::new((Vec::new(), Vec::new(), Vec::new()))
    };
}

/// Interleaved RGB bytes as four-float pixels.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn widen(rgb: &[u8], pixels: &mut [[f32; 4]]) {
    for (p, s) in pixels.iter_mut().zip(rgb.chunks_exact(3)) {
        *p = [s[0] as f32, s[1] as f32, s[2] as f32, 0.0];
    }
}

/// A line of pixels into three planes as uint8, rounded half to even and
/// clamped (torch's `round()` then `clamp`), mirrored when `flip`. Adding
/// 2^23 to a value in 0..=255 rounds it half to even (the default rounding
/// mode, as `rint` does) into the float's low mantissa bits, which are then
/// the byte.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn store(line: &[[f32; 4]], planes: [&mut [u8]; 3], flip: bool) {
    const MAGIC: f32 = 8_388_608.0;
    let n = line.len();
    let [r, g, b] = planes.map(|p| &mut p[..n]);
    // Pixel by pixel, its four lanes in one vector operation.
    for (x, px) in line.iter().enumerate() {
        let v = px.map(|c| (c.clamp(0.0, 255.0) + MAGIC).to_bits() as u8);
        (r[x], g[x], b[x]) = (v[0], v[1], v[2]);
    }
    if flip {
        for plane in [r, g, b] {
            plane.reverse();
        }
    }
}

/// One row of pixels to the kept output columns `kx..kx + dst.len()`
/// (`cols`: their taps): per output pixel the first tap's product, then
/// each further tap added as libtorch's kernel adds it (see
/// [`fused_from`]; the split is by the pixel's own count). Every pixel
/// takes as many taps as the widest (`N`, a constant for the usual few,
/// so the loop unrolls): a tap past a pixel's own has weight 0 (and reads
/// a pixel of `row`'s zero padding at the right edge), and `acc + s·0`
/// and `fma(s, 0, acc)` are `acc` exactly, so the sums are the same.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn row_pass(row: &[[f32; 4]], dst: &mut [[f32; 4]], cols: Option<&Taps>, kx: usize) {
    let Some(t) = cols else {
        dst.copy_from_slice(&row[kx..kx + dst.len()]);
        return;
    };
    let taps = (t, dst.len());
    match t.widest {
        1 => taps_n::<1>(row, dst, taps),
        2 => taps_n::<2>(row, dst, taps),
        3 => taps_n::<3>(row, dst, taps),
        4 => taps_n::<4>(row, dst, taps),
        5 => taps_n::<5>(row, dst, taps),
        6 => taps_n::<6>(row, dst, taps),
        7 => taps_n::<7>(row, dst, taps),
        8 => taps_n::<8>(row, dst, taps),
        _ => taps_any(row, dst, taps),
    }
}

/// The first of a pixel's `count` taps that libtorch's compiled kernel
/// multiply-adds fused. Its loop `out += src[j] * w[j]` is vectorized by
/// the compiler over the products only (its x86-64 code in the torch
/// 2.11 wheel, read with objdump): after the first tap's product, taps
/// come in groups of four whose products are rounded and then added one
/// by one, and the remaining one to three are fused multiply-adds. Up to
/// four taps, then, every tap after the first is fused. (That is the
/// kernel libtorch runs on a CPU with AVX2; on one without, its SSE build
/// fuses nothing, and a sum may differ in its last bit.)
fn fused_from(count: usize) -> usize {
    1 + count.saturating_sub(1) / 4 * 4
}

/// `acc + s·w` as libtorch's kernel sums tap `k` of a pixel whose fused
/// taps start at `fused` (see [`fused_from`]).
#[inline(always)]
fn add_tap(acc: &mut [f32; 4], s: &[f32; 4], w: f32, fused: bool) {
    for c in 0..4 {
        acc[c] = match fused {
            true => s[c].mul_add(w, acc[c]),
            false => acc[c] + s[c] * w,
        };
    }
}

/// [`row_pass`] with `N` taps a pixel: a tap past the pixel's own count
/// adds `s·0` (nothing) either way.
#[inline(always)]
fn taps_n<const N: usize>(row: &[[f32; 4]], dst: &mut [[f32; 4]], (t, n): (&Taps, usize)) {
    let weights = t.weights.chunks_exact(t.per);
    let taps = t.first[..n].iter().zip(&t.count[..n]);
    for ((px, (&f, &count)), w) in dst.iter_mut().zip(taps).zip(weights) {
        let src: &[[f32; 4]; N] = row[f..f + N].try_into().expect("N pixels");
        let w: &[f32; N] = w[..N].try_into().expect("N weights");
        let mut acc = src[0].map(|v| v * w[0]);
        match fused_from(count).min(N) {
            // Up to four taps (the usual): all fused, unrolled.
            1 => (1..N).for_each(|k| add_tap(&mut acc, &src[k], w[k], true)),
            fused => {
                (1..fused).for_each(|k| add_tap(&mut acc, &src[k], w[k], false));
                (fused..N).for_each(|k| add_tap(&mut acc, &src[k], w[k], true));
            }
        }
        *px = acc;
    }
}

/// [`row_pass`] with any number of taps (a strong reduction).
#[inline(always)]
fn taps_any(row: &[[f32; 4]], dst: &mut [[f32; 4]], (t, _): (&Taps, usize)) {
    for (x, px) in dst.iter_mut().enumerate() {
        let (f, n) = (t.first[x], t.count[x]);
        let w = &t.weights[x * t.per..x * t.per + n];
        let src = &row[f..f + n];
        let fused = fused_from(n);
        let mut acc = src[0].map(|v| v * w[0]);
        for k in 1..fused {
            add_tap(&mut acc, &src[k], w[k], false);
        }
        for k in fused..n {
            add_tap(&mut acc, &src[k], w[k], true);
        }
        *px = acc;
    }
}

/// The rows `rows` (each `line.len()` pixels, `weights.len()` of them)
/// summed into `line` with their weights, in libtorch's order.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn column_pass(rows: &[[f32; 4]], weights: &[f32], line: &mut [[f32; 4]]) {
    let n = line.len();
    for (d, s) in line.iter_mut().zip(&rows[..n]) {
        *d = s.map(|v| v * weights[0]);
    }
    let fused = fused_from(weights.len());
    for (k, &wk) in weights.iter().enumerate().skip(1) {
        let taps = line.iter_mut().zip(&rows[k * n..(k + 1) * n]);
        match k >= fused {
            true => taps.for_each(|(d, s)| add_tap(d, s, wk, true)),
            false => taps.for_each(|(d, s)| add_tap(d, s, wk, false)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// `r` (whole, not mirrored) of an `H x W x 3` uint8 image by
    /// libtorch's float path, as `3 x h x w` floats.
    fn libtorch_floats(img: &Tensor, r: &Resize) -> Tensor {
        let (top, left, h, w) = r.src;
        let window = img
            .permute([2, 0, 1])
            .narrow(1, top as i64, h as i64)
            .narrow(2, left as i64, w as i64);
        let window = window.unsqueeze(0).to_kind(Kind::Float);
        let size = [r.out.0 as i64, r.out.1 as i64];
        match r.filter {
            Filter::Bilinear => window.internal_upsample_bilinear2d_aa(size, false, None, None),
            Filter::Bicubic => window.internal_upsample_bicubic2d_aa(size, false, None, None),
        }
        .squeeze_dim(0)
    }

    /// Our float pixels of `r` (before rounding and mirroring), `3 x h x w`.
    fn our_floats(rgb: &[u8], width: usize, r: &Resize) -> Tensor {
        let (kh, kw) = (r.keep.2, r.keep.3);
        let mut px = vec![0f32; 3 * kh * kw];
        resize_lines(rgb, width, r, |y, line| {
            for (x, p) in line.iter().enumerate() {
                for c in 0..3 {
                    px[(c * kh + y) * kw + x] = p[c];
                }
            }
        });
        Tensor::from_slice(&px).view([3, kh as i64, kw as i64])
    }

    /// libtorch's float path (`_upsample_bilinear2d_aa` or
    /// `_upsample_bicubic2d_aa`) bit for bit before rounding, and then
    /// rounded and clamped: enlarging and shrinking (up to 18 taps a
    /// pixel, so every split of `fused_from` occurs), whole images and
    /// windows, mirrored or not.
    #[test]
    fn windows_resize_as_libtorch_does() {
        let _seeded = crate::seeded();
        tch::manual_seed(3);
        let cases = [
            (64, 48, (0, 0, 64, 48), (224, 224)),
            (500, 375, (0, 0, 500, 375), (256, 341)),
            (375, 500, (10, 37, 300, 401), (224, 224)),
            (97, 131, (5, 3, 41, 77), (32, 56)),
            (300, 300, (0, 0, 300, 300), (256, 256)),
            (90, 120, (0, 0, 90, 120), (256, 341)),
            (1000, 37, (0, 0, 1000, 37), (224, 9)),
        ];
        for (hh, ww, (top, left, h, w), (oh, ow)) in cases {
            let img = Tensor::randint(256, [hh, ww, 3], (Kind::Uint8, tch::Device::Cpu));
            let rgb = Vec::<u8>::try_from(img.view([-1])).unwrap();
            for (flip, filter) in [
                (false, Filter::Bilinear),
                (true, Filter::Bilinear),
                (false, Filter::Bicubic),
                (true, Filter::Bicubic),
            ] {
                let what = format!("{hh}x{ww} window {h}x{w} to {oh}x{ow} {filter:?}");
                let whole = (0, 0, oh, ow);
                let r = Resize {
                    src: (top, left, h, w),
                    out: (oh, ow),
                    keep: whole,
                    flip,
                    filter,
                };
                let floats = libtorch_floats(&img, &r);
                let differ = our_floats(&rgb, ww as usize, &r).ne_tensor(&floats);
                let differ = differ.sum(Kind::Int64).int64_value(&[]);
                assert_eq!(differ, 0, "{what}: {differ} floats differ");
                let theirs = floats.round().clamp(0.0, 255.0).to_kind(Kind::Uint8);
                let theirs = if flip { theirs.flip([2]) } else { theirs };
                let ours = resize_window(&rgb, ww as usize, &r);
                let ours = Tensor::from_slice(&ours).view([3, oh as i64, ow as i64]);
                assert!(ours.equal(&theirs), "{what}: rounded differently");
                // A kept window of the output is that window of the whole.
                let (ky, kx) = (oh / 3, ow / 5);
                let (kh, kw) = (oh - ky - 1, ow / 2);
                let keep = (ky, kx, kh, kw);
                let part = resize_window(&rgb, ww as usize, &Resize { keep, ..r });
                let fx = if flip { ow - kx - kw } else { kx };
                let expected = ours
                    .narrow(1, ky as i64, kh as i64)
                    .narrow(2, fx as i64, kw as i64);
                let part = Tensor::from_slice(&part).view([3, kh as i64, kw as i64]);
                assert!(part.equal(&expected), "{what}: a kept window differs");
            }
        }
    }
}

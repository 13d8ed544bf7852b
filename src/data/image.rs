//! Single images for prediction: decoding and torchvision's eval transform
//! (resize the shorter side with antialiasing, centre crop), as tensors.

use std::path::Path;

use anyhow::{Context, Result};
use tch::Tensor;
use zune_core::bytestream::ZCursor;

use super::resize::{Filter, Resize, resize_window};

/// The largest image file read.
const MAX_IMAGE_FILE: u64 = 1 << 30;

/// Whether a JPEG's image data reaches its end-of-image marker (FF D9), as
/// PIL insists: the segments before the first scan are skipped by their
/// lengths (an embedded thumbnail's marker does not count), then the marker
/// must follow. The decoder would fill a truncated image with grey.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let mut i = 2;
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        match marker {
            0xFF => i += 1,
            0xDA => return bytes[i..].windows(2).rev().any(|w| w == [0xFF, 0xD9]),
            0x01 | 0xD0..=0xD7 => i += 2,
            _ => i += 2 + u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize,
        }
    }
    false
}

/// The most pixels an image may have: twice PIL's `MAX_IMAGE_PIXELS`,
/// where PIL refuses an image as a decompression bomb.
pub const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// Decodes an image file (JPEG, PNG, BMP, PPM/PGM, TIFF or WebP; the
/// format from its content) into 8-bit RGB, as PIL's `convert("RGB")`
/// would take it: grayscale, CMYK and 16-bit images too (see [`rgb8`]). Its size is read from the header first and refused beyond
/// [`MAX_IMAGE_PIXELS`], before any pixel is decoded.
pub fn decode_rgb(path: &Path) -> Result<image::RgbImage> {
    Ok(decode_sized(path, |h, _| ((), h as usize))?.0)
}

/// [`decode_rgb`], calling `header(height, width)` with the header's size
/// before decoding; it returns a value and how many rows from the top are
/// needed (see [`decode_rows`]). Returns the image and that value.
pub fn decode_sized<T>(
    path: &Path,
    header: impl FnOnce(i64, i64) -> (T, usize),
) -> Result<(image::RgbImage, T)> {
    let bytes = crate::fsutil::read_regular(path, "an image", MAX_IMAGE_FILE)?;
    decode_rows(&bytes, path, header)
}

/// [`decode_rows`] of a whole image: `header(height, width)` gives a value.
pub fn decode_bytes<T>(
    bytes: &[u8],
    path: &Path,
    header: impl FnOnce(i64, i64) -> T,
) -> Result<(image::RgbImage, T)> {
    decode_rows(bytes, path, |h, w| (header(h, w), h as usize))
}

/// [`decode_sized`] of an image file's bytes (`path` names it in messages).
/// A colour (YCbCr or RGB) JPEG, nearly every photograph, is decoded by
/// zune-jpeg directly, with the options the `image` crate gives it, so the
/// pixels are the same without its copy of the file and second reading of
/// the header; anything else goes through `image`. The image may stop
/// after the rows `header` says are needed (a crop's last row and a
/// little more): a sequential JPEG is decoded only that far, with the same
/// pixels in those rows.
pub fn decode_rows<T>(
    bytes: &[u8],
    path: &Path,
    header: impl FnOnce(i64, i64) -> (T, usize),
) -> Result<(image::RgbImage, T)> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return decode_any(bytes, path, header);
    }
    if !jpeg_is_complete(bytes) {
        anyhow::bail!(
            "{}: not a readable image: truncated JPEG (its image data has no end marker)",
            path.display()
        );
    }
    use zune_core::colorspace::ColorSpace;
    let unreadable = |e: zune_jpeg::errors::DecodeErrors| {
        anyhow::Error::new(e).context(format!("{}: not a readable image", path.display()))
    };
    let options = zune_core::options::DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut jpeg = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    jpeg.decode_headers().map_err(unreadable)?;
    let colour = matches!(
        jpeg.input_colorspace(),
        Some(ColorSpace::YCbCr | ColorSpace::RGB)
    );
    let (Some((w, h0)), true) = (jpeg.dimensions(), colour) else {
        return decode_any(bytes, path, header);
    };
    check_pixels(w as u64, h0 as u64, path)?;
    let (told, rows) = header(h0 as i64, w as i64);
    let cut = shortened(bytes, h0, rows);
    let mut h = h0;
    if let Some((shorter, rows)) = &cut {
        jpeg = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(&shorter[..]), options);
        jpeg.decode_headers().map_err(unreadable)?;
        h = *rows;
    }
    let mut rgb = pixel_buffer(jpeg.output_buffer_size().unwrap_or(0), 3 * w * h0);
    jpeg.decode_into(&mut rgb).map_err(unreadable)?;
    let img = image::RgbImage::from_raw(w as u32, h as u32, rgb)
        .with_context(|| format!("{}: decoded to the wrong size", path.display()))?;
    Ok((img, told))
}

/// A copy of a JPEG of `height` rows that says it has fewer, at least
/// `rows` and one MCU row more (whose chroma the rows above it are
/// upsampled with), and that number: when its header allows (a sequential
/// JPEG with every component in its one scan, whose data is MCU rows in
/// order, so that a decoder stops after the first ones) and it saves rows.
fn shortened(bytes: &[u8], height: usize, rows: usize) -> Option<(Vec<u8>, usize)> {
    if rows >= height {
        return None;
    }
    let (at, mcu) = sequential_rows(bytes)?;
    let cut = (rows.div_ceil(mcu) + 1) * mcu;
    if cut >= height || usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]])) != height {
        return None;
    }
    let mut shorter = bytes.to_vec();
    shorter[at..at + 2].copy_from_slice(&(cut as u16).to_be_bytes());
    Some((shorter, cut))
}

/// Where a sequential (baseline or extended Huffman) JPEG whose first
/// scan holds all its components keeps its height (the offset of the
/// frame header's two height bytes), and its MCU's height in rows; None
/// for any other JPEG (progressive, lossless, arithmetic-coded, one scan
/// per component) or a malformed header.
fn sequential_rows(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut i = 2;
    let mut frame = None;
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return None;
        }
        let marker = bytes[i + 1];
        if matches!(marker, 0xFF | 0x01 | 0xD0..=0xD7) {
            i += if marker == 0xFF { 1 } else { 2 };
            continue;
        }
        let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        let segment = bytes.get(i + 4..i + 2 + len)?;
        match marker {
            0xC0 | 0xC1 => {
                // Precision, height, width, components (id, sampling, table).
                let n = usize::from(*segment.get(5)?);
                let tallest = (0..n)
                    .map(|c| segment.get(7 + 3 * c).map(|s| usize::from(s & 0x0F)))
                    .try_fold(0, |m, v| Some(m.max(v?)))?;
                frame = Some((i + 5, 8 * tallest.clamp(1, 4), n));
            }
            0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
            0xDA => {
                let (at, mcu, n) = frame?;
                return (usize::from(*segment.first()?) == n).then_some((at, mcu));
            }
            _ => {}
        }
        i += 2 + len;
    }
    None
}

/// Refuses an image of more than [`MAX_IMAGE_PIXELS`] from its header.
fn check_pixels(w: u64, h: u64, path: &Path) -> Result<()> {
    if w * h > MAX_IMAGE_PIXELS {
        anyhow::bail!(
            "{}: {w}x{h} pixels is more than an image may have ({MAX_IMAGE_PIXELS}, PIL's decompression-bomb limit)",
            path.display()
        );
    }
    Ok(())
}

/// [`decode_bytes`] of any image through the `image` crate.
fn decode_any<T>(
    bytes: &[u8],
    path: &Path,
    header: impl FnOnce(i64, i64) -> (T, usize),
) -> Result<(image::RgbImage, T)> {
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .with_context(|| format!("reading {}", path.display()))
    };
    let (w, h) = reader()?
        .into_dimensions()
        .with_context(|| format!("{}: not a readable image", path.display()))?;
    check_pixels(w as u64, h as u64, path)?;
    let (told, _) = header(h as i64, w as i64);
    let mut reader = reader()?;
    reader.no_limits();
    let img = reader
        .decode()
        .with_context(|| format!("{}: not a readable image", path.display()))?;
    Ok((rgb8(img), told))
}

/// `img` made gray in place, as a model trained on gray images reads it:
/// each pixel's luminance as PIL's `convert("L")` computes it (ITU-R 601-2
/// in 16-bit fixed point, rounded: `(19595 r + 38470 g + 7471 b + 2^15) >>
/// 16`), in all three channels. A gray image is left as it is.
pub fn to_luma(img: &mut image::RgbImage) {
    for p in img.pixels_mut() {
        let [r, g, b] = p.0.map(u32::from);
        let l = ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16) as u8;
        p.0 = [l; 3];
    }
}

/// An image in 8-bit RGB as PIL's `convert("RGB")` gives it: alpha
/// dropped, gray repeated, and 16 bits per sample cut to their high byte,
/// as PIL reads 16-bit colour (PIL clips 16-bit grayscale at 255 instead,
/// which turns most of such an image white; vggctl takes its high byte
/// too).
fn rgb8(img: image::DynamicImage) -> image::RgbImage {
    use image::DynamicImage::{ImageLuma16, ImageLumaA16, ImageRgb16, ImageRgba16};
    let high = |v: u16| (v >> 8) as u8;
    let (w, h) = (img.width(), img.height());
    let rgb: Option<Vec<u8>> = match &img {
        ImageLuma16(g) => Some(g.as_raw().iter().flat_map(|&v| [high(v); 3]).collect()),
        ImageLumaA16(g) => Some(
            g.as_raw()
                .chunks_exact(2)
                .flat_map(|p| [high(p[0]); 3])
                .collect(),
        ),
        ImageRgb16(c) => Some(c.as_raw().iter().map(|&v| high(v)).collect()),
        ImageRgba16(c) => Some(
            c.as_raw()
                .chunks_exact(4)
                .flat_map(|p| [high(p[0]), high(p[1]), high(p[2])])
                .collect(),
        ),
        _ => None,
    };
    match rgb {
        Some(px) => image::RgbImage::from_raw(w, h, px).expect("3 bytes a pixel"),
        None => img.into_rgb8(),
    }
}

/// An 8-bit RGB image as a `3 x H x W` uint8 tensor.
pub fn rgb_tensor(img: &image::RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    Tensor::from_slice(img.as_raw())
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .contiguous()
}

/// Decodes an image file into a `3 x H x W` uint8 tensor.
pub fn read_image(path: &Path) -> Result<Tensor> {
    Ok(rgb_tensor(&decode_rgb(path)?))
}

/// A `3 x H x W` uint8 tensor as interleaved RGB bytes, with its height
/// and width.
fn interleaved(img: &Tensor) -> (Vec<u8>, usize, usize) {
    let (_, h, w) = img.size3().expect("a 3 x H x W image");
    let hwc = img.permute([1, 2, 0]).contiguous().view([-1]);
    let bytes = Vec::<u8>::try_from(hwc).expect("a uint8 image");
    (bytes, h as usize, w as usize)
}

/// `resize::resize_window` as a `3 x h x w` uint8 tensor (`keep`'s size).
pub fn resized_window(rgb: &[u8], width: usize, r: &Resize) -> Tensor {
    let px = resize_window(rgb, width, r);
    Tensor::from_slice(&px).view([3, r.keep.2 as i64, r.keep.3 as i64])
}

/// Bilinear resize with antialiasing of a uint8 `3 x H x W` image, rounded
/// back to uint8 as torchvision's `F.resize(..., antialias=True)` does on a
/// tensor (its float path, bit for bit: see `resize`).
pub fn resize_u8(img: &Tensor, h: i64, w: i64) -> Tensor {
    let (rgb, ih, iw) = interleaved(img);
    resized_window(&rgb, iw, &Resize::whole((ih, iw), (h as usize, w as usize)))
}

/// The size torchvision's `Resize(short)` gives an image of `h` x `w`: the
/// shorter side `short`, the longer `int(short * long / shorter)`.
pub fn shorter_size(h: i64, w: i64, short: i64) -> (i64, i64) {
    if h <= w {
        (short, (short as f64 * w as f64 / h as f64) as i64)
    } else {
        ((short as f64 * h as f64 / w as f64) as i64, short)
    }
}

/// torchvision's `Resize(short)` of a uint8 `3 x H x W` image.
pub fn resize_shorter(img: &Tensor, short: i64) -> Tensor {
    let (_, h, w) = img.size3().expect("a 3 x H x W image");
    let (nh, nw) = shorter_size(h, w, short);
    resize_u8(img, nh, nw)
}

/// The offset of a centred window of `size` in `len` pixels, rounded as
/// torchvision's `CenterCrop` does with Python's `round()`: halves to even
/// (58.5 -> 58).
pub fn centre_offset(len: i64, size: i64) -> i64 {
    ((len - size) as f64 / 2.0).round_ties_even() as i64
}

/// The shorter side torchvision's evaluation resizes to before its centre
/// crop of `input` when nothing else is said: 256 for 224, the same ratio
/// at other sides.
pub const fn default_resize(input: i64) -> i64 {
    input * 256 / 224
}

/// torchvision's eval transform up to `ToTensor`: `Resize(resize,
/// filter)` (shorter side) then `CenterCrop(size)`; with `resize` None, the
/// whole image is resized to `size` x `size`. Returns uint8 `3 x size x
/// size`.
pub fn eval_transform(img: &Tensor, resize: Option<i64>, size: i64, filter: Filter) -> Tensor {
    let (rgb, h, w) = interleaved(img);
    eval_crop(&rgb, (h, w), (resize, size), filter)
}

/// [`eval_transform`] of an interleaved RGB image of `(height, width)`
/// with `filter`: only the crop's pixels of the resized image are
/// computed. A resize shorter than the crop (which checkpoints' metadata
/// never has) crops the whole resized image.
pub fn eval_crop(
    rgb: &[u8],
    (h, w): (usize, usize),
    (resize, size): (Option<i64>, i64),
    filter: Filter,
) -> Tensor {
    resized_window(rgb, w, &eval_window((h, w), resize, size).with(filter))
}

/// The resize [`eval_crop`] makes of an image of `(height, width)`
/// (bilinear; [`Resize::with`] another filter).
pub fn eval_window((h, w): (usize, usize), resize: Option<i64>, size: i64) -> Resize {
    let (nh, nw) = match resize {
        Some(short) => shorter_size(h as i64, w as i64, short),
        None => (size, size),
    };
    let (kh, kw) = (size.min(nh), size.min(nw));
    let keep = (
        centre_offset(nh, kh) as usize,
        centre_offset(nw, kw) as usize,
        kh as usize,
        kw as usize,
    );
    Resize {
        keep,
        ..Resize::whole((h, w), (nh as usize, nw as usize))
    }
}

thread_local! {
    /// A decoded image's buffer given back by [`recycle`], for the
    /// thread's next image: a fresh buffer of this size is fresh pages
    /// from the kernel, each faulted in.
    static PIXELS: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `n` bytes for decoded pixels (the decoder writes them all), in the
/// thread's recycled buffer when there is one and it is not far larger
/// (one huge image must not keep its memory held by the thread): its
/// bytes are the last image's, and only bytes beyond them are zeroed. A
/// buffer that must grow takes `whole` (the whole image's bytes), so that
/// images of one size cut at different rows keep reusing it.
fn pixel_buffer(n: usize, whole: usize) -> Vec<u8> {
    let mut buffer = PIXELS.take();
    if buffer.capacity() > 4 * n.max(1 << 20) {
        buffer = Vec::new();
    }
    buffer.truncate(n);
    buffer.reserve_exact(whole.max(n) - buffer.len());
    buffer.resize(n, 0);
    buffer
}

/// Gives a decoded image's buffer back for the thread's next image.
pub fn recycle(img: image::RgbImage) {
    PIXELS.set(img.into_raw());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every gray level stays as it is; pure red, green and blue and one
    /// mixed pixel get PIL's `convert("L")` values (76, 150, 29 and 124).
    #[test]
    fn luma_is_pils_and_keeps_gray() {
        let gray: Vec<u8> = (0..=255u8).flat_map(|v| [v; 3]).collect();
        let mut img = image::RgbImage::from_raw(256, 1, gray.clone()).unwrap();
        to_luma(&mut img);
        assert_eq!(img.as_raw(), &gray);
        let colours = vec![255, 0, 0, 0, 255, 0, 0, 0, 255, 200, 100, 50];
        let mut img = image::RgbImage::from_raw(4, 1, colours).unwrap();
        to_luma(&mut img);
        let luma: Vec<u8> = img.pixels().map(|p| p.0[0]).collect();
        assert_eq!(luma, [76, 150, 29, 124]);
        assert!(img.pixels().all(|p| p.0 == [p.0[0]; 3]));
    }

    /// A JPEG or PNG cut to a third of its bytes is refused (the JPEG
    /// decoder alone would fill the missing rows with grey); whole files decode.
    #[test]
    fn truncated_images_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img =
            image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 7]));
        for (name, format) in [
            ("a.jpg", image::ImageFormat::Jpeg),
            ("a.png", image::ImageFormat::Png),
        ] {
            let path = dir.path().join(name);
            img.save_with_format(&path, format).unwrap();
            assert_eq!(decode_rgb(&path).unwrap().dimensions(), (64, 48));
            let bytes = std::fs::read(&path).unwrap();
            if format == image::ImageFormat::Jpeg {
                assert!(jpeg_is_complete(&bytes));
                assert!(!jpeg_is_complete(&bytes[..bytes.len() / 3]));
            }
            std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
            let err = format!("{:#}", decode_rgb(&path).unwrap_err());
            assert!(err.contains(name), "{err}");
        }
    }

    /// The direct zune-jpeg path gives the `image` crate's pixels for
    /// colour photographs (4:2:0 and 4:4:4, the fixture's real photos).
    #[test]
    fn colour_jpegs_decode_as_the_image_crate_does() {
        let dir = tempfile::tempdir().unwrap();
        let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos");
        let mut files = vec![];
        for class in std::fs::read_dir(photos).unwrap() {
            for f in std::fs::read_dir(class.unwrap().path()).unwrap() {
                files.push(std::fs::read(f.unwrap().path()).unwrap());
            }
        }
        // A 4:4:4 one too (the `image` encoder's subsampling).
        let img =
            image::RgbImage::from_fn(61, 47, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 7]));
        let path = dir.path().join("a.jpg");
        img.save_with_format(&path, image::ImageFormat::Jpeg)
            .unwrap();
        files.push(std::fs::read(&path).unwrap());
        let jpegs: Vec<_> = files
            .iter()
            .filter(|b| b.starts_with(&[0xFF, 0xD8]) && jpeg_is_complete(b))
            .collect();
        assert!(jpegs.len() >= 3, "the fixture's JPEGs");
        for bytes in jpegs {
            let ours = decode_bytes(bytes, &path, |h, w| (h, w)).unwrap();
            let theirs = decode_any(bytes, &path, |h, w| ((h, w), h as usize)).unwrap();
            assert_eq!(ours.1, theirs.1);
            assert!(ours.0 == theirs.0, "pixels differ");
        }
    }

    /// A JPEG decoded only as far as a crop needs has the whole decode's
    /// pixels in the rows asked for (the fixture's real 4:2:0 photos and a
    /// 4:4:4 one, cut at every MCU row), and stops early; a progressive
    /// JPEG's header is not cut.
    #[test]
    fn jpegs_cut_short_keep_their_rows() {
        let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos");
        let mut files = vec![];
        for class in std::fs::read_dir(photos).unwrap() {
            for f in std::fs::read_dir(class.unwrap().path()).unwrap() {
                let bytes = std::fs::read(f.unwrap().path()).unwrap();
                if bytes.starts_with(&[0xFF, 0xD8]) && jpeg_is_complete(&bytes) {
                    files.push(bytes);
                }
            }
        }
        let img = image::RgbImage::from_fn(61, 90, |x, y| image::Rgb([x as u8 * 4, y as u8, 7]));
        let mut small = vec![];
        image::codecs::jpeg::JpegEncoder::new(&mut small)
            .encode_image(&img)
            .unwrap();
        files.push(small);
        let path = Path::new("a.jpg");
        let mut cut = 0;
        for bytes in &files {
            let whole = decode_bytes(bytes, path, |_, _| ()).unwrap().0;
            let row = 3 * whole.width() as usize;
            for rows in (1..whole.height() as usize).step_by(7) {
                let part = decode_rows(bytes, path, |_, _| ((), rows)).unwrap().0;
                assert!(part.height() as usize >= rows);
                assert!(whole.as_raw()[..rows * row] == part.as_raw()[..rows * row]);
                cut += usize::from(part.height() < whole.height());
            }
        }
        assert!(cut > 20, "{cut} decodes were cut short");
        let mut progressive = files[0].clone();
        let at = progressive
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .unwrap();
        assert!(sequential_rows(&progressive).is_some());
        progressive[at + 1] = 0xC2;
        assert!(sequential_rows(&progressive).is_none());
    }
}

//! The canny edge map a canny ControlNet is trained on, as OpenCV's
//! `cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high)` makes it (what
//! ControlNet's own preprocessing calls): OpenCV's fixed-point grey, a 3×3 Sobel with a
//! replicated border and no blur, the L1 gradient magnitude, non-maximum suppression in
//! four sectors, and hysteresis over 8-connected pixels.

use super::Image;
use crate::error::{Error, Result};

/// The default lower threshold (ControlNet's canny examples and A1111's).
pub const CANNY_LOW: f64 = 100.0;
/// The default upper threshold.
pub const CANNY_HIGH: f64 = 200.0;

/// tan 22.5° in OpenCV's 15-bit fixed point: the sector bounds of the suppression.
const TG22: i64 = 13573;

/// The edge map of `image`: white (255) edges on black, as RGB. `low` and `high` are the
/// hysteresis thresholds on `|gx| + |gy|` (candidates above `low`, edges above `high`
/// and candidates connected to them); OpenCV's order of the two does not matter.
pub fn canny(image: &Image, low: f64, high: f64) -> Result<Image> {
    let (w, h) = (image.width, image.height);
    if image.rgb.len() != w * h * 3 {
        return Err(Error::invalid(
            "image",
            "pixel buffer does not match its size",
        ));
    }
    if !low.is_finite() || !high.is_finite() || low < 0.0 || high < 0.0 {
        return Err(Error::invalid(
            "low",
            "the thresholds must be finite numbers ≥ 0",
        ));
    }
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    // OpenCV compares integer magnitudes against the thresholds rounded down.
    let (low, high) = (low.floor() as i64, high.floor() as i64);
    let grey: Vec<i64> = (image.rgb.chunks_exact(3))
        .map(|p| (9798 * p[0] as i64 + 19235 * p[1] as i64 + 3735 * p[2] as i64 + (1 << 14)) >> 15)
        .collect();
    let at = |x: isize, y: isize| {
        let x = x.clamp(0, w as isize - 1) as usize;
        let y = y.clamp(0, h as isize - 1) as usize;
        grey[y * w + x]
    };
    let mut gx = vec![0i64; w * h];
    let mut gy = vec![0i64; w * h];
    let mut mag = vec![0i64; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let dx = (at(x + 1, y - 1) + 2 * at(x + 1, y) + at(x + 1, y + 1))
                - (at(x - 1, y - 1) + 2 * at(x - 1, y) + at(x - 1, y + 1));
            let dy = (at(x - 1, y + 1) + 2 * at(x, y + 1) + at(x + 1, y + 1))
                - (at(x - 1, y - 1) + 2 * at(x, y - 1) + at(x + 1, y - 1));
            let i = y as usize * w + x as usize;
            gx[i] = dx;
            gy[i] = dy;
            mag[i] = dx.abs() + dy.abs();
        }
    }
    let m = |x: isize, y: isize| {
        if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
            0
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    // 0: not an edge, 1: candidate, 2: edge.
    let mut map = vec![0u8; w * h];
    let mut stack = Vec::new();
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            let v = mag[i];
            if v <= low {
                continue;
            }
            let (ax, ay) = (gx[i].abs(), gy[i].abs());
            let keep = if (ay << 15) < ax * TG22 {
                v > m(x - 1, y) && v >= m(x + 1, y)
            } else if (ay << 15) > ax * (TG22 + (1 << 16)) {
                v > m(x, y - 1) && v >= m(x, y + 1)
            } else {
                let s = if (gx[i] < 0) != (gy[i] < 0) { -1 } else { 1 };
                v > m(x - s, y - 1) && v > m(x + s, y + 1)
            };
            if keep {
                if v > high {
                    map[i] = 2;
                    stack.push(i);
                } else {
                    map[i] = 1;
                }
            }
        }
    }
    while let Some(i) = stack.pop() {
        let (x, y) = ((i % w) as isize, (i / w) as isize);
        for (dx, dy) in [
            (-1, -1),
            (0, -1),
            (1, -1),
            (-1, 0),
            (1, 0),
            (-1, 1),
            (0, 1),
            (1, 1),
        ] {
            let (nx, ny) = (x + dx, y + dy);
            if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                continue;
            }
            let j = ny as usize * w + nx as usize;
            if map[j] == 1 {
                map[j] = 2;
                stack.push(j);
            }
        }
    }
    Ok(Image {
        width: w,
        height: h,
        rgb: map
            .iter()
            .flat_map(|&v| [if v == 2 { 255 } else { 0 }; 3])
            .collect(),
    })
}

//! Boxes from the averaged probability map: binarise at the region's threshold, label connected
//! components, box and score each, keep the best, and map them back to original pixels.

use serde::{Deserialize, Serialize};

use crate::transform::Placement;

/// `[postprocess.boxes]`; calibration draws its boxes with the same settings.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BoxConfig {
    /// Components smaller than this many map cells are noise.
    pub min_area: usize,
    /// Most boxes per radiograph.
    pub top_k: usize,
}

impl Default for BoxConfig {
    fn default() -> Self {
        Self {
            min_area: 2,
            top_k: 5,
        }
    }
}

/// A box in map cells: x0, y0 inclusive; x1, y1 exclusive; its score is the maximum inside.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CellBox {
    pub x0: usize,
    pub y0: usize,
    pub x1: usize,
    pub y1: usize,
    pub area: usize,
    pub score: f32,
}

/// A box in original pixels: x0, y0 inclusive; x1, y1 exclusive; its score is the map's maximum
/// inside.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredBox {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
    pub score: f32,
}

/// 8-connected components of `map >= threshold`.
pub fn components(map: &[f32], size: usize, threshold: f32) -> Vec<CellBox> {
    let mut label = vec![false; map.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..map.len() {
        if label[start] || map[start] < threshold {
            continue;
        }
        label[start] = true;
        stack.push(start);
        let mut b = CellBox {
            x0: usize::MAX,
            y0: usize::MAX,
            x1: 0,
            y1: 0,
            area: 0,
            score: f32::MIN,
        };
        while let Some(i) = stack.pop() {
            let (x, y) = (i % size, i / size);
            b.x0 = b.x0.min(x);
            b.y0 = b.y0.min(y);
            b.x1 = b.x1.max(x + 1);
            b.y1 = b.y1.max(y + 1);
            b.area += 1;
            b.score = b.score.max(map[i]);
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= size as i64 || ny >= size as i64 {
                        continue;
                    }
                    let j = ny as usize * size + nx as usize;
                    if !label[j] && map[j] >= threshold {
                        label[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        out.push(b);
    }
    out
}

/// The boxes for one radiograph. A positive call always gets at least one box (around the map's
/// strongest region); a negative one gets none.
pub fn boxes(
    map: &[f32],
    map_size: usize,
    threshold: f32,
    fracture: bool,
    placement: &Placement,
    cfg: &BoxConfig,
) -> Vec<ScoredBox> {
    if !fracture || map_size == 0 || map.len() != map_size * map_size {
        return Vec::new();
    }
    let mut found: Vec<CellBox> = components(map, map_size, threshold)
        .into_iter()
        .filter(|b| b.area >= cfg.min_area)
        .collect();
    if found.is_empty() {
        // Called positive by the score but nothing passes the map threshold: box the strongest
        // region, taken as the component around the maximum at half its value.
        let max = map.iter().copied().fold(f32::MIN, f32::max);
        let at = map.iter().position(|&v| v == max).unwrap_or(0);
        found = components(map, map_size, max * 0.5)
            .into_iter()
            .filter(|b| {
                (b.x0..b.x1).contains(&(at % map_size)) && (b.y0..b.y1).contains(&(at / map_size))
            })
            .collect();
    }
    found.sort_by(|a, b| b.score.total_cmp(&a.score));
    found.truncate(cfg.top_k.max(1));
    // Map cell -> model-input pixels -> original pixels.
    let cell = placement.size as f64 / map_size as f64;
    found
        .into_iter()
        .map(|b| {
            let [x0, y0, x1, y1] =
                placement.box_to_original([b.x0, b.y0, b.x1, b.y1].map(|c| c as f64 * cell));
            ScoredBox {
                x0,
                y0,
                x1,
                y1,
                score: b.score,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement() -> Placement {
        // 64x64 model input from a 200x100 crop at (10, 20) of a 300x200 image: scale 0.32.
        Placement {
            crop: [10, 20, 210, 120],
            scale: 0.32,
            size: 64,
        }
    }

    #[test]
    fn finds_known_components() {
        let n = 8;
        let mut map = vec![0.0f32; n * n];
        for (x, y) in [(1, 1), (2, 1), (2, 2)] {
            map[y * n + x] = 0.9;
        }
        for (x, y) in [(6, 5), (6, 6), (7, 7)] {
            map[y * n + x] = 0.7; // diagonal neighbours join (8-connectivity)
        }
        map[4 * n] = 0.95; // a single cell: below min_area 2
        let c = components(&map, n, 0.5);
        assert_eq!(c.len(), 3);
        let b = boxes(&map, n, 0.5, true, &placement(), &BoxConfig::default());
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].score, 0.9);
        // Cells 1..3 x 1..3 of an 8-cell map over 64 px: 8 px per cell -> 8..24 px -> /0.32 +crop.
        assert!((b[0].x0 - (10.0 + 8.0 / 0.32)).abs() < 1e-9);
        assert!((b[0].y1 - (20.0 + 24.0 / 0.32)).abs() < 1e-9);
        assert_eq!(b[1].score, 0.7);
    }

    #[test]
    fn positive_always_boxed_negative_never() {
        let n = 8;
        let mut map = vec![0.1f32; n * n];
        map[3 * n + 3] = 0.3;
        map[3 * n + 4] = 0.25;
        let pos = boxes(&map, n, 0.5, true, &placement(), &BoxConfig::default());
        assert_eq!(pos.len(), 1);
        assert_eq!(pos[0].score, 0.3);
        assert!(boxes(&map, n, 0.5, false, &placement(), &BoxConfig::default()).is_empty());
        // Boxes never leave the crop.
        let full = vec![0.9f32; n * n];
        let b = boxes(&full, n, 0.5, true, &placement(), &BoxConfig::default());
        assert_eq!(
            (b[0].x0, b[0].y0, b[0].x1, b[0].y1),
            (10.0, 20.0, 210.0, 120.0)
        );
    }

    #[test]
    fn top_k_keeps_the_strongest_in_order() {
        let n = 16;
        let mut map = vec![0.0f32; n * n];
        // Six 2x2 blobs, three cells apart, of increasing strength.
        for k in 0..6 {
            let (x, y) = ((k % 3) * 5, (k / 3) * 5);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                map[(y + dy) * n + x + dx] = 0.5 + 0.05 * k as f32;
            }
        }
        assert_eq!(components(&map, n, 0.5).len(), 6);
        let cfg = BoxConfig {
            min_area: 2,
            top_k: 3,
        };
        let b = boxes(&map, n, 0.5, true, &placement(), &cfg);
        let scores: Vec<f32> = b.iter().map(|b| b.score).collect();
        assert_eq!(scores, vec![0.75, 0.7, 0.65]);
        // top_k 0 still gives a positive its one box.
        let one = boxes(
            &map,
            n,
            0.5,
            true,
            &placement(),
            &BoxConfig {
                min_area: 2,
                top_k: 0,
            },
        );
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].score, 0.75);
    }

    #[test]
    fn a_positive_with_only_specks_is_boxed_around_the_strongest() {
        let n = 8;
        let mut map = vec![0.1f32; n * n];
        map[2 * n + 5] = 0.9; // single cells above the threshold: below min_area
        map[6 * n + 1] = 0.8;
        map[2 * n + 6] = 0.5; // above half the maximum, beside it: part of its region
        let b = boxes(&map, n, 0.7, true, &placement(), &BoxConfig::default());
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].score, 0.9);
        // Cells 5..7 x 2..3: 8 px per cell -> x 40..56, y 16..24 model px.
        let cell = |c: f64| c * 8.0 / 0.32;
        assert!((b[0].x0 - (10.0 + cell(5.0))).abs() < 1e-9);
        assert!((b[0].x1 - (10.0 + cell(7.0))).abs() < 1e-9);
        assert!((b[0].y0 - (20.0 + cell(2.0))).abs() < 1e-9);
        assert!((b[0].y1 - (20.0 + cell(3.0))).abs() < 1e-9);
    }

    #[test]
    fn a_map_of_the_wrong_size_gives_no_boxes() {
        assert!(boxes(
            &[0.9; 10],
            4,
            0.5,
            true,
            &placement(),
            &BoxConfig::default()
        )
        .is_empty());
    }
}

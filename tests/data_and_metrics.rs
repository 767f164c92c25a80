//! Procedural scenes (determinism, masks, occlusion, counterfactuals) and the evaluation
//! metrics (hand-made cases with known answers, Hungarian matching, baselines).

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slotserve::data::{scene_seed, Rendered, Scene, SceneConfig, Split};
use slotserve::eval::baselines::{kmeans_labels, one_cluster_labels, KMeansConfig};
use slotserve::eval::metrics::{
    adjusted_rand_index, compact_labels, fg_ari, hungarian_miou, linear_sum_assignment,
    masked_psnr, mean_best_overlap, psnr, segmentation_scores, U8_RANGE, UNIT_RANGE,
};
use slotserve::eval::{baseline_reports, best_slot, format_table, held_out_scenes, Report};

const TOL: f64 = 1e-9;

fn scene(seed: u64) -> Scene {
    Scene::generate(&SceneConfig::default(), seed)
}

fn pixel(r: &Rendered, p: usize) -> &[u8] {
    &r.image[3 * p..3 * p + 3]
}

/// The id a painter's-order renderer must show at each pixel, from the footprints alone.
fn expected_labels(scene: &Scene) -> Vec<u32> {
    let footprints: Vec<Vec<bool>> =
        scene.objects.iter().map(|o| o.footprint(scene.width, scene.height)).collect();
    (0..scene.width * scene.height)
        .map(|p| {
            (0..footprints.len()).rev().find(|&i| footprints[i][p]).map_or(0, |i| i as u32 + 1)
        })
        .collect()
}

/// The image of the scene's background alone.
fn background_only(scene: &Scene) -> Rendered {
    Scene { objects: Vec::new(), ..scene.clone() }.render()
}

// ---------------------------------------------------------------- scenes

#[test]
fn same_seed_same_bytes_different_seeds_differ() {
    for seed in [0, 1, 7, u64::MAX] {
        let (a, b) = (scene(seed), scene(seed));
        assert_eq!(a, b);
        assert_eq!(a.render(), b.render());
    }
    let images: Vec<Vec<u8>> = (0..8).map(|s| scene(s).render().image).collect();
    for i in 0..images.len() {
        for j in i + 1..images.len() {
            assert_ne!(images[i], images[j], "seeds {i} and {j}");
        }
    }
}

#[test]
fn splits_are_disjoint() {
    assert_eq!(scene_seed(Split::Train, 5), 5);
    assert!(scene_seed(Split::Eval, 0) > scene_seed(Split::Train, (1 << 63) - 1));
    let held_out = held_out_scenes(&SceneConfig::default(), 2);
    assert_eq!(held_out[1], scene(scene_seed(Split::Eval, 1)));
}

#[test]
fn masks_partition_the_image_and_follow_painters_order() {
    let cfg = SceneConfig::default();
    for seed in 0..30 {
        let s = scene(seed);
        let r = s.render();
        let (hw, k) = (r.width * r.height, r.num_masks);
        assert_eq!((r.width, r.height, k), (64, 64, cfg.max_objects + 1));
        assert_eq!((r.image.len(), r.labels.len()), (3 * hw, hw));
        assert!((cfg.min_objects..=cfg.max_objects).contains(&s.objects.len()));
        let masks = r.masks();
        assert_eq!(masks.len(), k * hw);
        for p in 0..hw {
            let on: Vec<usize> = (0..k).filter(|&c| masks[c * hw + p] == 1).collect();
            assert_eq!(on, vec![r.labels[p] as usize], "seed {seed} pixel {p}");
        }
        assert_eq!(r.labels, expected_labels(&s), "seed {seed}");
        // The top object is never occluded.
        let top = s.objects.len();
        let footprint = s.objects[top - 1].footprint(r.width, r.height);
        assert!(footprint.iter().zip(&r.labels).all(|(&f, &l)| !f || l == top as u32));
        // Every object is visible, as placement makes sure when it can.
        for id in 1..=top as u32 {
            assert!(r.labels.contains(&id), "seed {seed}: object {id} hidden");
        }
    }
}

#[test]
fn scenes_are_varied() {
    let mut kinds = [0usize; slotserve::data::Shape::KINDS];
    let mut counts = [0usize; 7];
    let (mut shared, mut flat, mut occluded) = (0, 0, 0);
    for seed in 0..120 {
        let s = scene(seed);
        let r = s.render();
        counts[s.objects.len()] += 1;
        for o in &s.objects {
            kinds[o.shape.kind()] += 1;
        }
        shared += usize::from(s.shares_a_colour());
        let background = background_only(&s);
        flat += usize::from(background.image.chunks(3).all(|px| px == &background.image[..3]));
        let full: usize =
            s.objects.iter().map(|o| o.footprint(64, 64).iter().filter(|&&b| b).count()).sum();
        occluded += usize::from(r.labels.iter().filter(|&&l| l > 0).count() < full);
    }
    assert!(kinds.iter().all(|&n| n > 20), "shape kinds {kinds:?}");
    assert!(counts[2..].iter().all(|&n| n > 10), "object counts {counts:?}");
    assert!(shared > 10, "{shared} scenes share a colour");
    assert!((5..60).contains(&flat), "{flat} flat backgrounds");
    assert!(occluded > 30, "{occluded} scenes with occlusion");
}

#[test]
fn a_scene_shares_a_colour_when_two_of_its_objects_have_one() {
    let mut s = (0..).map(scene).find(|s| s.objects.len() >= 3).unwrap();
    for (i, object) in s.objects.iter_mut().enumerate() {
        object.color = [40 * i as u8, 200, 10];
    }
    assert!(!s.shares_a_colour());
    let last = s.objects.len() - 1;
    s.objects[last].color = s.objects[1].color;
    assert!(s.shares_a_colour());
    assert!(!s.without(last).shares_a_colour());
}

#[test]
fn size_and_count_are_parameters() {
    let cfg = SceneConfig { width: 48, height: 32, ..SceneConfig::crowded() };
    let s = Scene::generate(&cfg, 3);
    let r = s.render();
    assert!((7..=9).contains(&s.objects.len()));
    assert_eq!((r.image.len(), r.num_masks), (48 * 32 * 3, 10));
    assert_eq!(r.labels, expected_labels(&s));
}

#[test]
fn removal_reveals_what_was_behind_and_keeps_the_rest() {
    for seed in 0..20 {
        let s = scene(seed);
        let r = s.render();
        let background = background_only(&s);
        for i in 0..s.objects.len() {
            let removed_id = i as u32 + 1;
            let w = s.without(i).render();
            assert_eq!(w.labels, expected_labels(&s.without(i)));
            for p in 0..r.labels.len() {
                let l = r.labels[p];
                if l == removed_id {
                    // Revealed: whatever lies below, background where nothing does.
                    assert!(w.labels[p] < removed_id, "seed {seed} pixel {p}");
                    if w.labels[p] == 0 {
                        assert_eq!(pixel(&w, p), pixel(&background, p));
                    }
                } else {
                    let shifted = if l > removed_id { l - 1 } else { l };
                    assert_eq!(w.labels[p], shifted);
                    assert_eq!(pixel(&w, p), pixel(&r, p), "seed {seed} pixel {p}");
                }
            }
        }
    }
}

#[test]
fn removal_makes_objects_behind_whole() {
    // Object 0 alone, then object 1 on top: without object 1, object 0 is its full footprint.
    let s = scene(11);
    let pair = Scene { objects: s.objects[..2].to_vec(), ..s.clone() };
    let w = pair.without(1).render();
    let footprint = pair.objects[0].footprint(64, 64);
    assert_eq!(w.region(1), footprint);
}

#[test]
fn added_object_goes_on_top() {
    let (a, b) = (scene(4), scene(5));
    let added = a.with_object_from(&b, 0);
    let (ra, r) = (a.render(), added.render());
    let id = added.objects.len() as u32;
    let footprint = b.objects[0].footprint(64, 64);
    for (p, &inside) in footprint.iter().enumerate() {
        if inside {
            assert_eq!(r.labels[p], id);
        } else {
            assert_eq!((r.labels[p], pixel(&r, p)), (ra.labels[p], pixel(&ra, p)));
        }
    }
    assert_eq!(r.num_masks, a.max_objects.max(added.objects.len()) + 1);
}

#[test]
fn png_helpers_round_trip() {
    let dir = std::env::temp_dir().join(format!("slotserve-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("scene.png");
    let written = slotserve::data::write_scene(&SceneConfig::default(), 9, &out, true).unwrap();
    assert_eq!(written, vec![out.clone(), dir.join("scene_masks.png")]);
    let r = scene(9).render();
    let image = image::open(&out).unwrap().to_rgb8();
    assert_eq!(image.into_raw(), r.image);
    let masks = image::open(&written[1]).unwrap().to_rgb8().into_raw();
    let want: Vec<u8> = r.labels.iter().flat_map(|&l| slotserve::data::palette_color(l)).collect();
    assert_eq!(masks, want);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------- metrics

/// A 4x4 ground truth: background row, object 1 (4 px), object 2 (6 px), object 3 (2 px).
const GT: [u32; 16] = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3];

#[test]
fn perfect_and_permuted_segmentations_score_one() {
    let permuted: Vec<u32> = GT.iter().map(|&g| [5, 2, 0, 7][g as usize]).collect();
    for pred in [GT.to_vec(), permuted] {
        let s = segmentation_scores(&GT, &pred);
        assert!((s.fg_ari - 1.0).abs() < TOL, "{s:?}");
        assert!((s.mbo.unwrap() - 1.0).abs() < 1e-6, "{s:?}");
        assert!((s.miou - 1.0).abs() < 1e-6, "{s:?}");
        assert!((s.fg_miou.unwrap() - 1.0).abs() < 1e-6, "{s:?}");
    }
}

#[test]
fn one_cluster_scores_zero_fg_ari_with_several_objects() {
    assert_eq!(fg_ari(&GT, &one_cluster_labels(16)), 0.0);
    // Official degenerate cases score 1: one object in one cluster, no foreground at all.
    let one_object = [0, 0, 1, 1, 1];
    assert_eq!(fg_ari(&one_object, &[3, 4, 0, 0, 0]), 1.0);
    assert_eq!(fg_ari(&[0, 0, 0], &[0, 1, 2]), 1.0);
    assert_eq!(fg_ari(&[0, 0, 1], &[0, 1, 2]), 1.0);
    // One object split in two: ARI 0 (the expected index equals the index).
    assert_eq!(fg_ari(&one_object, &[0, 0, 1, 1, 2]), 0.0);
    // mBO / fg-mIoU need foreground; mIoU with background does not.
    assert_eq!(mean_best_overlap(&[0, 0], &[1, 1]), None);
    assert_eq!(hungarian_miou(&[0, 0], &[1, 1], true), None);
    assert!((hungarian_miou(&[0, 0], &[1, 1], false).unwrap() - 1.0).abs() < 1e-6);
}

#[test]
fn ari_matches_a_hand_computed_example() {
    // truth {a,a,a,b,b,b}, prediction {x,x,y,y,z,z}:
    // contingency [[2,1,0],[0,1,2]] -> index = 2+2 = 4 (ordered pairs n(n-1)),
    // rows 3,3 -> 12, columns 2,2,2 -> 6, all 6*5 = 30 -> expected 12*6/30 = 2.4,
    // max (12+6)/2 = 9 -> ARI = (4-2.4)/(9-2.4) = 0.2424...
    let want = 1.6 / 6.6;
    let (truth, pred) = ([1, 1, 1, 2, 2, 2], [0, 0, 1, 1, 2, 2]);
    assert!((adjusted_rand_index(&truth, &pred, false) - want).abs() < TOL);
    // FG-ARI drops background pixels whatever they were predicted as.
    let truth_bg = [0, 1, 1, 1, 0, 2, 2, 2, 0];
    let pred_bg = [2, 0, 0, 1, 0, 1, 2, 2, 1];
    assert!((fg_ari(&truth_bg, &pred_bg) - want).abs() < TOL);
    // Plain ARI keeps them and differs.
    assert!((adjusted_rand_index(&truth_bg, &pred_bg, false) - want).abs() > 0.01);
}

#[test]
fn mbo_reuses_segments_and_hungarian_does_not() {
    // One predicted segment covers objects 1 and 2 (10 px), another covers bg + object 3.
    let pred = [9, 9, 9, 9, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 9, 9];
    // IoU: obj1 (4 px) vs seg 4 (10 px) = 0.4, obj2 (6 px) vs seg 4 = 0.6, obj3 vs seg 9 = 2/6.
    let mbo = (0.4 + 0.6 + 2.0 / 6.0) / 3.0;
    assert!((mean_best_overlap(&GT, &pred).unwrap() - mbo).abs() < 1e-6);
    // Hungarian: only two segments for three objects: obj2-seg4 (0.6) + obj3-seg9 (1/3);
    // obj1 unmatched counts 0.
    let fg_miou = (0.6 + 2.0 / 6.0) / 3.0;
    assert!((hungarian_miou(&GT, &pred, true).unwrap() - fg_miou).abs() < 1e-6);
    // With background as a segment: bg-seg9 (4/6) + obj2-seg4 (0.6), over four segments.
    let miou = (4.0 / 6.0 + 0.6) / 4.0;
    assert!((hungarian_miou(&GT, &pred, false).unwrap() - miou).abs() < 1e-6);
}

#[test]
fn ground_truth_ids_are_compacted_like_the_official_loader() {
    assert_eq!(compact_labels(&[0, 4, 4, 9, 0]), vec![0, 1, 1, 2, 0]);
    // Quirk kept: without a background pixel the smallest id becomes background.
    assert_eq!(compact_labels(&[3, 5, 5]), vec![0, 1, 1]);
    // A gap in ids would otherwise count as an object with IoU 0.
    let gapped = [0, 0, 1, 1, 3, 3];
    assert!((mean_best_overlap(&gapped, &gapped).unwrap() - 2.0 / 3.0).abs() < 1e-6);
    assert!((segmentation_scores(&gapped, &gapped).mbo.unwrap() - 1.0).abs() < 1e-6);
}

fn assignment_total(weights: &[Vec<f64>], pairs: &[(usize, usize)]) -> f64 {
    pairs.iter().map(|&(r, c)| weights[r][c]).sum()
}

/// The best total over all injective maps of the smaller side into the larger, by search.
fn brute_force_max(weights: &[Vec<f64>]) -> f64 {
    fn go(w: &[Vec<f64>], row: usize, used: &mut Vec<bool>) -> f64 {
        if row == w.len() {
            return 0.0;
        }
        let mut best = f64::NEG_INFINITY;
        for c in 0..used.len() {
            if !used[c] {
                used[c] = true;
                best = best.max(w[row][c] + go(w, row + 1, used));
                used[c] = false;
            }
        }
        best
    }
    let (rows, cols) = (weights.len(), weights[0].len());
    let transposed: Vec<Vec<f64>> =
        (0..cols).map(|c| (0..rows).map(|r| weights[r][c]).collect()).collect();
    let w = if rows <= cols { weights } else { &transposed };
    go(w, 0, &mut vec![false; w[0].len()])
}

#[test]
fn hungarian_beats_greedy_and_matches_brute_force() {
    // Greedy takes 0.9 then is left with 0.1 (total 1.0); the optimum is 0.8 + 0.8.
    let tricky = vec![vec![0.9, 0.8], vec![0.8, 0.1]];
    assert_eq!(linear_sum_assignment(&tricky, true), vec![(0, 1), (1, 0)]);
    assert_eq!(linear_sum_assignment(&tricky, false), vec![(0, 0), (1, 1)]);
    // A classic 3x3 minimisation with optimum 5 (columns 1, 0, 2).
    let costs = vec![vec![4.0, 1.0, 3.0], vec![2.0, 0.0, 5.0], vec![3.0, 2.0, 2.0]];
    assert_eq!(linear_sum_assignment(&costs, false), vec![(0, 1), (1, 0), (2, 2)]);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for (rows, cols) in [(1, 1), (3, 3), (4, 6), (6, 4), (6, 6), (5, 7), (7, 2)] {
        for _ in 0..20 {
            // Coarse values make ties common.
            let w: Vec<Vec<f64>> = (0..rows)
                .map(|_| (0..cols).map(|_| rng.random_range(0..5) as f64 / 4.0).collect())
                .collect();
            let pairs = linear_sum_assignment(&w, true);
            assert_eq!(pairs.len(), rows.min(cols));
            let mut seen_r: Vec<_> = pairs.iter().map(|p| p.0).collect();
            let mut seen_c: Vec<_> = pairs.iter().map(|p| p.1).collect();
            seen_r.dedup();
            seen_c.sort_unstable();
            seen_c.dedup();
            assert_eq!((seen_r.len(), seen_c.len()), (pairs.len(), pairs.len()));
            let total = assignment_total(&w, &pairs);
            assert!((total - brute_force_max(&w)).abs() < 1e-12, "{w:?}");
        }
    }
}

#[test]
fn psnr_known_values() {
    let a = vec![0.0f32; 12];
    let b = vec![0.1f32; 12];
    // mse 0.01 -> 20 dB.
    assert!((psnr(&a, &b, UNIT_RANGE) - 20.0).abs() < 1e-5);
    let x = vec![100u8; 12];
    let mut y = x.clone();
    y[..6].iter_mut().for_each(|v| *v += 10);
    // mse 50 over all values; 100 inside the first two pixels, 0 outside.
    let want = 10.0 * (255.0f64 * 255.0 / 50.0).log10();
    assert!((psnr(&x, &y, U8_RANGE) - want).abs() < 1e-9);
    let region = [true, true, false, false];
    let inside = 10.0 * (255.0f64 * 255.0 / 100.0).log10();
    assert!((masked_psnr(&x, &y, &region, U8_RANGE).unwrap() - inside).abs() < 1e-9);
    let outside = [false, false, true, true];
    assert_eq!(masked_psnr(&x, &y, &outside, U8_RANGE), Some(f64::INFINITY));
    assert_eq!(masked_psnr(&x, &y, &[false; 4], U8_RANGE), None);
}

// ---------------------------------------------------------------- baselines and reports

#[test]
fn kmeans_separates_two_colours() {
    let image: Vec<u8> =
        (0..64).flat_map(|p| if p % 8 < 3 { [220, 30, 30] } else { [20, 40, 200] }).collect();
    let cfg = KMeansConfig { clusters: 2, iterations: 10, seed: 1 };
    let labels = kmeans_labels(&image, &cfg);
    assert_eq!(labels, kmeans_labels(&image, &cfg));
    let truth: Vec<u32> = (0..64).map(|p| 1 + u32::from(p % 8 < 3)).collect();
    assert_eq!(fg_ari(&truth, &labels), 1.0);
    // More clusters than colours still labels every pixel by its colour.
    let labels = kmeans_labels(&image, &KMeansConfig { clusters: 5, ..cfg });
    assert_eq!(fg_ari(&truth, &labels), 1.0);
}

#[test]
fn baselines_and_table_on_scenes() {
    let scenes = held_out_scenes(&SceneConfig::default(), 8);
    let rendered: Vec<Rendered> = scenes.iter().map(Scene::render).collect();
    let reports = baseline_reports(&scenes, &rendered, &KMeansConfig::default(), (16, 16)).unwrap();
    let (kmeans, one, oracle) = (&reports[0], &reports[1], &reports[2]);
    assert_eq!((kmeans.scenes, one.scenes, oracle.scenes), (8, 8, 8));
    assert_eq!(one.fg_ari.value(), Some(0.0));
    let k_ari = kmeans.fg_ari.value().unwrap();
    assert!(k_ari > 0.0 && k_ari < 1.0, "k-means FG-ARI {k_ari}");
    // the truth pooled to a coarse grid loses only the edges; on a grid of single pixels
    // nothing
    let o_ari = oracle.fg_ari.value().unwrap();
    assert!(o_ari > k_ari && o_ari < 1.0, "16×16 grid truth FG-ARI {o_ari}");
    let exact = baseline_reports(&scenes, &rendered, &KMeansConfig::default(), (64, 64)).unwrap();
    for value in [exact[2].fg_ari.value(), exact[2].mbo.value()] {
        assert!((value.unwrap() - 1.0).abs() < 1e-9, "1×1-pixel grid truth scores {value:?}");
    }
    // where the objects went: one cluster puts every object in the background's slot, the exact
    // truth every object in a slot of its own
    let objects = one.outcomes.total();
    assert!(objects >= 16, "{objects} visible objects in 8 scenes of 2 to 6");
    assert_eq!(one.outcomes.counts()[5], objects);
    assert_eq!((exact[2].outcomes.counts()[0], exact[2].outcomes.total()), (objects, objects));
    let table = format_table(&reports);
    assert!(table.contains("FG-ARI") && table.contains("one cluster"), "{table}");
    assert!(table.contains("truth on the 16×16 grid"), "{table}");
    assert_eq!(table.lines().count(), 4);
}

#[test]
fn removal_scores_and_best_slot() {
    let s = scene(2);
    let r = s.render();
    let id = 1;
    // A prediction that is the ground truth shifted by one id finds the object's slot.
    let pred: Vec<u32> = r.labels.iter().map(|&l| l + 1).collect();
    assert_eq!(best_slot(&r.labels, &pred, id), Some(id + 1));
    assert_eq!(best_slot(&r.labels, &pred, 99), None);
    // The perfect edit is infinitely good; the unedited image is finite inside, exact outside.
    let truth = s.without(0).render();
    let region = r.region(id);
    let mut report = Report::new("oracle");
    let (inside, outside) = report.add_removal(&truth.image, &truth.image, &region);
    assert_eq!((inside, outside), (Some(f64::INFINITY), Some(f64::INFINITY)));
    let (inside, outside) = report.add_removal(&r.image, &truth.image, &region);
    assert!(inside.unwrap().is_finite());
    assert_eq!(outside, Some(f64::INFINITY));
    assert_eq!(report.add_reconstruction(&r.image, &r.image), f64::INFINITY);
}

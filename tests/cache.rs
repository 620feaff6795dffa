//! The decoded-data cache: decoded once, mapped afterwards (nothing decoded again), rebuilt when a source
//! file changes or a cache file is damaged, bit-identical to decoding into memory, safe with concurrent
//! builders. One test function: the cache's counters are per process.
mod common;

use common::tmp_dir;
use std::path::{Path, PathBuf};
use std::process::Command;
use tpp::data::{DataOptions, Dataset, cache};

/// A class-folder data set: 3 classes x 6 16x16 PNGs, each image distinct.
fn write_folder(root: &Path) {
    for (c, name) in ["a", "b", "c"].iter().enumerate() {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..6u32 {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                image::Rgb([(x * 16 + i) as u8, (y * 16) as u8, (c as u32 * 80 + i * 7) as u8])
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

fn opts(cache: Option<PathBuf>) -> DataOptions {
    DataOptions { image_size: Some(16), cache, ..Default::default() }
}

fn same(a: &Dataset, b: &Dataset) -> bool {
    [(&a.train, &b.train), (&a.val, &b.val), (&a.test, &b.test)]
        .iter()
        .all(|(x, y)| x.images.equal(&y.images) && x.labels.equal(&y.labels))
        && a.num_classes == b.num_classes
        && a.task == b.task
}

/// The one entry folder of a cache folder, and its array files.
fn entry(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(entries.len(), 1, "one entry and no leftovers: {entries:?}");
    let files = std::fs::read_dir(&entries[0])
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "u8"))
        .collect();
    (entries[0].clone(), files)
}

#[test]
fn decoded_once_rebuilt_when_sources_or_cache_files_change_and_identical_to_memory() {
    let dir = tmp_dir("cache");
    let data = dir.join("folder");
    write_folder(&data);
    let cdir = dir.join("cache");
    let memory = tpp::data::open_with(&data, &opts(None)).unwrap().0;

    // First open builds, the second maps: no decoding.
    let (h0, b0) = cache::counters();
    let (first, rec1) = tpp::data::open_with(&data, &opts(Some(cdir.clone()))).unwrap();
    assert_eq!(cache::counters(), (h0, b0 + 1));
    let (second, rec2) = tpp::data::open_with(&data, &opts(Some(cdir.clone()))).unwrap();
    assert_eq!(cache::counters(), (h0 + 1, b0 + 1), "the second open decoded again");
    assert!(same(&first, &memory) && same(&second, &memory), "cached data differ from decoded data");
    assert_eq!(rec1, rec2);

    // Another image size is another entry.
    let small = DataOptions { image_size: Some(8), ..opts(Some(cdir.clone())) };
    assert_eq!(tpp::data::open_with(&data, &small).unwrap().0.train.images.size()[2], 8);
    assert_eq!(cache::counters().1, b0 + 2);
    std::fs::remove_dir_all(&cdir).unwrap();
    tpp::data::open_with(&data, &opts(Some(cdir.clone()))).unwrap();
    let b1 = cache::counters().1;

    // A changed source file rebuilds, and the new bytes are read.
    let changed = data.join("b/2.png");
    image::RgbImage::from_pixel(16, 16, image::Rgb([9, 9, 9])).save(&changed).unwrap();
    let reread = tpp::data::open_with(&data, &opts(Some(cdir.clone()))).unwrap().0;
    assert_eq!(cache::counters().1, b1 + 1, "a changed file did not rebuild the entry");
    assert!(same(&reread, &tpp::data::open_with(&data, &opts(None)).unwrap().0));
    // So does an added one.
    image::RgbImage::from_pixel(16, 16, image::Rgb([1, 2, 3])).save(data.join("c/9.png")).unwrap();
    let grown = tpp::data::open_with(&data, &opts(Some(cdir.clone()))).unwrap().0;
    assert_eq!(cache::counters().1, b1 + 2, "an added file did not rebuild the entry");
    assert_eq!(grown.train.len() + grown.val.len() + grown.test.len(), 19);

    // A damaged cache file (one flipped byte, or truncated) is detected and rebuilt, never read as data.
    let truth = tpp::data::open_with(&data, &opts(None)).unwrap().0;
    for damage in ["flip", "truncate"] {
        let (_, files) = entry(&cdir);
        let f = &files[0];
        let mut bytes = std::fs::read(f).unwrap();
        if damage == "flip" {
            bytes[3] ^= 0xff;
        } else {
            bytes.truncate(bytes.len() / 2);
        }
        std::fs::write(f, &bytes).unwrap();
        let before = cache::counters().1;
        let healed = tpp::data::open_with(&data, &opts(Some(cdir.clone()))).unwrap().0;
        assert_eq!(cache::counters().1, before + 1, "{damage}: the damaged entry was not rebuilt");
        assert!(same(&healed, &truth), "{damage}: damaged cache data were read");
    }

    // MedMNIST npz files stream into the cache (grey, and colour in both memory orders) and read back the same.
    let colour = |file: &Path, order: npyz::Order| {
        use npyz::WriterBuilder;
        let mut npz = npyz::npz::NpzWriter::create(file).unwrap();
        for split in ["train", "val", "test"] {
            let values: Vec<u8> = (0..6u32 * 8 * 8 * 3).map(|i| (i * 13 % 251) as u8).collect();
            let w = npz.array::<u8>(&format!("{split}_images"), Default::default()).unwrap().default_dtype();
            let mut w = w.shape(&[6, 8, 8, 3]).order(order).begin_nd().unwrap();
            w.extend(values).unwrap();
            w.finish().unwrap();
            let w = npz.array::<u8>(&format!("{split}_labels"), Default::default()).unwrap().default_dtype();
            let mut w = w.shape(&[6, 1]).begin_nd().unwrap();
            w.extend((0..6u8).map(|i| i % 2)).unwrap();
            w.finish().unwrap();
        }
    };
    let (c_npz, f_npz) = (dir.join("c.npz"), dir.join("f.npz"));
    colour(&c_npz, npyz::Order::C);
    colour(&f_npz, npyz::Order::Fortran);
    let breast = common::fixture("../../data/breastmnist.npz");
    for npz in [&breast, &c_npz, &f_npz] {
        let before = cache::counters().1;
        let cached = tpp::data::open_with(npz, &opts(Some(dir.join("cache-npz")))).unwrap().0;
        assert_eq!(cache::counters().1, before + 1);
        let again = tpp::data::open_with(npz, &opts(Some(dir.join("cache-npz")))).unwrap().0;
        assert_eq!(cache::counters().1, before + 1, "{}: decoded again", npz.display());
        let memory = tpp::data::open(npz, None).unwrap();
        assert!(same(&cached, &memory) && same(&again, &memory), "{}: cached data differ", npz.display());
    }

    // A bad file: an error naming it (nothing cached), or with skip_bad the same split as in memory.
    let data2 = dir.join("folder_bad");
    write_folder(&data2);
    std::fs::write(data2.join("b/zz.png"), b"not a png").unwrap();
    let cdir5 = dir.join("cache5");
    let e = tpp::data::open_with(&data2, &opts(Some(cdir5.clone()))).err().unwrap();
    assert!(format!("{e:#}").contains("zz.png") && format!("{e:#}").contains("--skip-bad"), "{e:#}");
    assert!(cache::entries(&cdir5).unwrap().is_empty());
    let skip = |cache| DataOptions { skip_bad: true, ..opts(cache) };
    let (a, ra) = tpp::data::open_with(&data2, &skip(Some(cdir5.clone()))).unwrap();
    let (b, rb) = tpp::data::open_with(&data2, &skip(None)).unwrap();
    assert!(same(&a, &b) && ra == rb && ra.unwrap().0.len() == 18);

    // A build killed midway leaves a temporary folder; the next build of that entry removes it.
    let cdir6 = dir.join("cache6");
    tpp::data::open_with(&data, &opts(Some(cdir6.clone()))).unwrap();
    let (e6, _) = entry(&cdir6);
    let name6 = e6.file_name().unwrap().to_str().unwrap().to_string();
    let dead = cdir6.join(format!(".{name6}.tmp-999999999-0"));
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::write(dead.join("all.images.u8"), [0u8; 100]).unwrap();
    std::fs::remove_dir_all(&e6).unwrap();
    tpp::data::open_with(&data, &opts(Some(cdir6.clone()))).unwrap();
    entry(&cdir6);

    // Concurrent builders of one new entry: all get the same data, one entry remains, nothing left over.
    let cdir2 = dir.join("cache2");
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (data, cdir2) = (data.clone(), cdir2.clone());
            std::thread::spawn(move || tpp::data::open_with(&data, &opts(Some(cdir2))).map(|(d, _)| d))
        })
        .collect();
    for h in handles {
        assert!(same(&h.join().unwrap().unwrap(), &truth));
    }
    entry(&cdir2);

    // The CLI: `data cache` builds, `data info` lists, a fine-tuning run through the cache gives the same
    // test metrics as one without it, `data cache --clear` empties it.
    let tpp_bin = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_tpp")).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{args:?}: {err}");
        (String::from_utf8_lossy(&o.stdout).into_owned(), err)
    };
    let d = data.to_str().unwrap();
    // Concurrent builders in separate processes.
    let cdir4 = dir.join("cache4");
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_tpp"))
                .args(["--cache-dir", cdir4.to_str().unwrap(), "data", "cache", d, "--img-size", "16"])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    entry(&cdir4);
    let cdir3 = dir.join("cache3");
    let c3 = cdir3.to_str().unwrap();
    let (_, err) = tpp_bin(&["--cache-dir", c3, "data", "cache", d, "--img-size", "32", "--grey"]);
    assert!(err.contains("cached (19 images at 32 px)"), "{err}");
    let (_, err) = tpp_bin(&["--cache-dir", c3, "data", "cache", d, "--img-size", "32", "--grey"]);
    assert!(err.contains("already cached"), "{err}");
    let (out, _) = tpp_bin(&["--cache-dir", c3, "data", "info"]);
    assert!(out.contains("(1 entries)") && out.contains("folder") && out.contains("19 images"), "{out}");
    let backbone = common::fixture("timm_vit_avg_fcnorm.safetensors");
    let metrics = |cache: &[&str], out: &str| {
        let run = dir.join(out);
        let mut args: Vec<&str> = cache.to_vec();
        args.extend(["--threads", "1", "finetune", "--backbone", backbone.to_str().unwrap(), "--heads", "3"]);
        args.extend(["--img-size", "32", "--data", d, "--norm", "half", "--epochs", "2", "--batch-size", "4"]);
        args.extend(["--out", run.to_str().unwrap()]);
        tpp_bin(&args);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
        let keys = ["accuracy", "auc", "ci95", "confusion", "predictions"];
        assert!(keys.iter().all(|k| !v[k].is_null()), "{v}");
        keys.map(|k| v[k].to_string())
    };
    assert_eq!(metrics(&["--cache-dir", c3], "with"), metrics(&["--no-cache"], "without"));
    tpp_bin(&["--cache-dir", c3, "data", "cache", "--clear"]);
    let (out, _) = tpp_bin(&["--cache-dir", c3, "data", "info"]);
    assert!(out.contains("(0 entries)"), "{out}");
}

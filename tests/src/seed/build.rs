//! Building images and indexes in memory (CPU only).

use std::io::Write;

use anyhow::Result;
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use rand::{RngCore, SeedableRng, rngs::StdRng};
use serde_json::json;

use super::{Blob, Flavour, ImageSpec, Platform, PushedImage, PushedIndex};
use crate::util::sha256_digest;

/// Fast incompressible filler (xorshift64*), seeded from `rng`: generating tens of MB with
/// ChaCha is slow in unoptimised test builds.
fn fill_random(rng: &mut StdRng, buf: &mut [u8]) {
    let mut x = rng.next_u64() | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Builds one layer: a tar with `regmirror/layer-N.bin` of `size` random bytes, gzipped.
/// Returns (uncompressed tar digest, compressed bytes).
fn build_layer(
    rng: &mut StdRng,
    index: usize,
    size: usize,
    gzip_level: u32,
) -> Result<(String, Bytes)> {
    let mut data = vec![0u8; size];
    fill_random(rng, &mut data);
    let mut tar = tar::Builder::new(Vec::with_capacity(size + 4096));
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_mtime(1_700_000_000);
    dir.set_cksum();
    tar.append_data(&mut dir, "regmirror/", std::io::empty())?;
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_mode(0o644);
    file.set_size(size as u64);
    file.set_mtime(1_700_000_000);
    file.set_cksum();
    tar.append_data(&mut file, format!("regmirror/layer-{index}.bin"), &data[..])?;
    drop(data);
    let tar_bytes = tar.into_inner()?;
    let diff_id = sha256_digest(&tar_bytes);
    let mut gz = GzEncoder::new(
        Vec::with_capacity(tar_bytes.len() + 1024),
        Compression::new(gzip_level.min(9)),
    );
    gz.write_all(&tar_bytes)?;
    Ok((diff_id, Bytes::from(gz.finish()?)))
}

/// Builds an image in memory (CPU only, no network).
pub fn build_image(spec: &ImageSpec) -> Result<PushedImage> {
    let seed = spec.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let flavour = spec.flavour;
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, size) in spec.layers.iter().enumerate() {
        let (diff_id, gz) = build_layer(&mut rng, i, *size, spec.gzip_level)?;
        diff_ids.push(diff_id);
        layers.push(Blob::new(flavour.layer_media_type(), gz));
    }
    let mut config = json!({
        "architecture": spec.platform.architecture,
        "os": spec.platform.os,
        "created": "2024-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"regmirror.e2e.seed": seed.to_string()}
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": (0..spec.layers.len())
            .map(|i| json!({"created": "2024-01-01T00:00:00Z", "created_by": format!("regmirror-e2e synthetic layer {i}")}))
            .collect::<Vec<_>>(),
    });
    if let Some(v) = &spec.platform.variant {
        config["variant"] = json!(v);
    }
    let config = Blob::new(flavour.config_media_type(), serde_json::to_vec(&config)?);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": flavour.manifest_media_type(),
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    let manifest = Bytes::from(serde_json::to_vec_pretty(&manifest)?);
    Ok(PushedImage {
        digest: sha256_digest(&manifest),
        manifest,
        media_type: flavour.manifest_media_type().to_owned(),
        config,
        layers,
        diff_ids,
        platform: spec.platform.clone(),
        flavour,
    })
}

/// Builds a Docker manifest list / OCI index over `children` (no network).
pub fn build_index(flavour: Flavour, children: &[(Platform, PushedImage)]) -> Result<PushedIndex> {
    let index = json!({
        "schemaVersion": 2,
        "mediaType": flavour.index_media_type(),
        "manifests": children.iter().map(|(p, img)| img.descriptor(Some(p))).collect::<Vec<_>>(),
    });
    let manifest = Bytes::from(serde_json::to_vec_pretty(&index)?);
    Ok(PushedIndex {
        digest: sha256_digest(&manifest),
        manifest,
        media_type: flavour.index_media_type().to_owned(),
        flavour,
        children: children.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::OCI_LAYER;
    use serde_json::Value;

    #[test]
    fn seeded_images_are_reproducible_and_layers_incompressible() {
        let spec = ImageSpec::oci(&[100_000, 0]).seed(7);
        let a = build_image(&spec).unwrap();
        let b = build_image(&spec).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.layers.len(), 2);
        assert!(
            a.layers[0].size() > 100_000,
            "random data should not compress"
        );
        let m: Value = serde_json::from_slice(&a.manifest).unwrap();
        assert_eq!(m["layers"][0]["mediaType"], OCI_LAYER);
        assert_eq!(m["config"]["digest"], a.config.digest.as_str());
    }
}

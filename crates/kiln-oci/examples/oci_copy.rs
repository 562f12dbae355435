//! Measures kiln-oci's stores on big images (time and peak RSS with `/usr/bin/time -v`).
//!
//! ```text
//! oci_copy gen DIR MIB LAYERS         write a layout DIR:big with LAYERS random layers of MIB each
//! oci_copy oci SRC_DIR DST_DIR        copy SRC_DIR:big to DST_DIR:big (every blob verified)
//! oci_copy archive SRC_DIR FILE       write SRC_DIR:big as a docker-archive
//! oci_copy read-archive FILE DST_DIR  read a docker-archive into DST_DIR:big
//! ```

use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Instant;

use kiln_oci::archive::{DockerArchive, write_docker_archive};
use kiln_oci::{
    Algorithm, Descriptor, ImageBuilder, ImageConfig, OciLayout, Platform, PlatformMatcher,
    media_type,
};

/// xorshift bytes: incompressible enough, fast, no dependency.
struct Noise(u64);

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Ok(buf.len())
    }
}

fn generate(dir: &Path, mib: u64, layers: u64) -> Result<(), Box<dyn std::error::Error>> {
    let layout = OciLayout::create(dir)?;
    let mut config = ImageConfig::default();
    config.set_platform(&Platform::host());
    let mut files = Vec::new();
    for i in 0..layers {
        let mut w = layout.blob_writer(Algorithm::Sha256)?;
        io::copy(&mut Noise(0x9e37_79b9_7f4a_7c15 ^ (i + 1)).take(mib << 20), &mut w)?;
        w.flush()?;
        let (digest, size) = w.commit()?;
        // Not a real tar: the stores never look inside layers, only validate does.
        config.rootfs.diff_ids.push(digest.clone());
        files.push((
            Descriptor::new(media_type::OCI_LAYER_TAR, digest.clone(), size),
            layout.blob_path(&digest),
        ));
    }
    let mut b = ImageBuilder::new(config);
    for (d, p) in files {
        b = b.layer(d, p);
    }
    let image = b.build()?;
    layout.write_image(&image, Some("big"))?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let host = PlatformMatcher::only(&Platform::host());
    let start = Instant::now();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["gen", dir, mib, layers] => generate(Path::new(dir), mib.parse()?, layers.parse()?)?,
        ["oci", src, dst] => {
            let image = OciLayout::open(*src)?.image(Some("big"), &host)?;
            let d = OciLayout::create(*dst)?.write_image(&image, Some("big"))?;
            eprintln!("wrote {}", d.digest);
        }
        ["archive", src, file] => {
            let image = OciLayout::open(*src)?.image(Some("big"), &host)?;
            write_docker_archive(Path::new(file), &image, &["example.test/big:latest"])?;
        }
        ["read-archive", file, dst] => {
            let image = DockerArchive::open(*file)?.image(None)?;
            let d = OciLayout::create(*dst)?.write_image(&image, Some("big"))?;
            eprintln!("wrote {}", d.digest);
        }
        _ => {
            eprintln!("usage: see the doc comment of examples/oci_copy.rs");
            std::process::exit(2);
        }
    }
    eprintln!("{:.2}s", start.elapsed().as_secs_f64());
    Ok(())
}

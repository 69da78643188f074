//! The FileSystem implementation called directly, the way a hostile guest
//! could call it over virtio-fs (no kernel VFS in between): writes are
//! EROFS, unknown inodes and handles are errors, never panics.
mod common;

use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions};
use std::ffi::CString;
use std::sync::Arc;
use std::time::Duration;
use tvix_virtiofsd::castore::Node;
use tvix_virtiofsd::nix::store_path::StorePath;
use tvix_virtiofsd::store::{blob, Store};
use tvix_virtiofsd::view::{FsConfig, StoreFs, ROOT_INO};

fn errno<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn setup() -> (tokio::runtime::Runtime, Arc<StoreFs>, String) {
    setup_with(FsConfig {
        list_root: false,
        store_timeout: Duration::from_secs(5),
        ..Default::default()
    })
}

fn setup_with(cfg: FsConfig) -> (tokio::runtime::Runtime, Arc<StoreFs>, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Store::memory();
    let sp = StorePath::from_basename("00000000000000000000000000000000-file").unwrap();
    rt.block_on(async {
        let digest = blob::put_bytes(store.blob.as_ref(), b"contents")
            .await
            .unwrap();
        store
            .path_info
            .put(common::bare_path_info(
                sp.clone(),
                Node::File {
                    digest,
                    size: 8,
                    executable: false,
                },
            ))
            .await
            .unwrap();
    });
    let fs = Arc::new(StoreFs::new(store, rt.handle().clone(), cfg));
    (rt, fs, sp.to_basename())
}

#[test]
fn writes_are_erofs_and_bad_ids_are_errors() {
    let (_rt, fs, name) = setup();
    let ctx = Context::default();
    let cname = CString::new(name.clone()).unwrap();
    let e = fs.lookup(&ctx, ROOT_INO, &cname).unwrap();
    assert!(e.inode > ROOT_INO);
    assert_eq!(e.attr.st_size, 8);
    assert_eq!(e.attr.st_mode & 0o7777, 0o444);
    let x = CString::new("x").unwrap();
    assert_eq!(errno(fs.mkdir(&ctx, ROOT_INO, &x, 0o755, 0)), libc::EROFS);
    assert_eq!(errno(fs.unlink(&ctx, ROOT_INO, &cname)), libc::EROFS);
    assert_eq!(errno(fs.rmdir(&ctx, ROOT_INO, &x)), libc::EROFS);
    assert_eq!(errno(fs.symlink(&ctx, &x, ROOT_INO, &x)), libc::EROFS);
    assert_eq!(errno(fs.link(&ctx, e.inode, ROOT_INO, &x)), libc::EROFS);
    assert_eq!(
        errno(fs.rename(&ctx, ROOT_INO, &cname, ROOT_INO, &x, 0)),
        libc::EROFS
    );
    assert_eq!(errno(fs.setxattr(&ctx, e.inode, &x, b"v", 0)), libc::EROFS);
    assert_eq!(errno(fs.removexattr(&ctx, e.inode, &x)), libc::EROFS);
    // SAFETY: stat64 is plain data.
    let st: libc::stat64 = unsafe { std::mem::zeroed() };
    assert_eq!(
        errno(fs.setattr(
            &ctx,
            e.inode,
            st,
            None,
            fuse_backend_rs::api::filesystem::SetattrValid::MODE
        )),
        libc::EROFS
    );
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(errno(fs.open(&ctx, e.inode, flags as u32, 0)), libc::EROFS);
    }
    // unknown inodes and handles from a guest
    for ino in [0, 999_999, u64::MAX] {
        assert_eq!(errno(fs.getattr(&ctx, ino, None)), libc::ENOENT);
        assert_eq!(errno(fs.lookup(&ctx, ino, &x)), libc::ENOENT);
        assert_eq!(
            errno(fs.open(&ctx, ino, libc::O_RDONLY as u32, 0)),
            libc::ENOENT
        );
        fs.forget(&ctx, ino, 10);
    }
    assert_eq!(errno(fs.readlink(&ctx, e.inode)), libc::EINVAL);
    // looking up below a file is ENOTDIR
    assert_eq!(errno(fs.lookup(&ctx, e.inode, &x)), libc::ENOTDIR);
    // an open file reads; forget releases the inode
    let (h, _, _) = fs.open(&ctx, e.inode, libc::O_RDONLY as u32, 0).unwrap();
    assert!(h.is_some());
    fs.forget(&ctx, e.inode, 1);
    assert_eq!(fs.inode_count(), 0);
    assert_eq!(errno(fs.getattr(&ctx, e.inode, None)), libc::ENOENT);
}

/// A guest that reboots keeps the connection and sends INIT again (with or
/// without DESTROY first); what its old kernel held is dropped, and the
/// new one can look everything up again.
#[test]
fn a_second_init_drops_the_old_kernels_inodes_and_handles() {
    let (_rt, fs, name) = setup();
    let ctx = Context::default();
    let cname = CString::new(name).unwrap();
    for destroy_first in [false, true] {
        let e = fs.lookup(&ctx, ROOT_INO, &cname).unwrap();
        let (h, _, _) = fs.open(&ctx, e.inode, libc::O_RDONLY as u32, 0).unwrap();
        assert!(h.is_some());
        assert_eq!((fs.inode_count(), fs.handle_count()), (1, 1));
        if destroy_first {
            fs.destroy();
        } else {
            fs.init(FsOptions::empty()).unwrap();
        }
        assert_eq!((fs.inode_count(), fs.handle_count()), (0, 0));
        assert_eq!(errno(fs.getattr(&ctx, e.inode, None)), libc::ENOENT);
        fs.init(FsOptions::empty()).unwrap();
        let again = fs.lookup(&ctx, ROOT_INO, &cname).unwrap();
        assert_eq!(again.attr.st_size, 8);
        fs.forget(&ctx, again.inode, 1);
    }
}

/// A guest that opens without releasing runs into the handle bound
/// (ENFILE), and releasing makes room again.
#[test]
fn open_handles_are_bounded() {
    let (_rt, fs, name) = setup_with(FsConfig {
        max_handles: 3,
        ..Default::default()
    });
    let ctx = Context::default();
    let e = fs
        .lookup(&ctx, ROOT_INO, &CString::new(name).unwrap())
        .unwrap();
    let open = || fs.open(&ctx, e.inode, libc::O_RDONLY as u32, 0);
    let hs: Vec<u64> = (0..3).map(|_| open().unwrap().0.unwrap()).collect();
    assert_eq!(errno(open()), libc::ENFILE);
    assert_eq!(fs.handle_count(), 3);
    fs.release(&ctx, e.inode, 0, hs[0], false, false, None)
        .unwrap();
    // releasing an unknown or already released handle frees nothing
    fs.release(&ctx, e.inode, 0, hs[0], false, false, None)
        .unwrap();
    fs.release(&ctx, e.inode, 0, 999, false, false, None)
        .unwrap();
    assert!(open().is_ok());
    assert_eq!(errno(open()), libc::ENFILE);
}

#[test]
fn names_are_part_of_store_paths() {
    let (_rt, fs, name) = setup();
    let ctx = Context::default();
    let other = CString::new(format!("{}-other", &name[..32])).unwrap();
    assert_eq!(fs.lookup(&ctx, ROOT_INO, &other).unwrap().inode, 0);
    for junk in [
        "x",
        "..",
        "00000000000000000000000000000000",
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x",
    ] {
        let c = CString::new(junk).unwrap();
        assert_eq!(fs.lookup(&ctx, ROOT_INO, &c).unwrap().inode, 0, "{junk}");
    }
}

#[test]
fn xattrs_expose_digests() {
    use fuse_backend_rs::api::filesystem::GetxattrReply;
    let (_rt, fs, name) = setup();
    let ctx = Context::default();
    let e = fs
        .lookup(&ctx, ROOT_INO, &CString::new(name).unwrap())
        .unwrap();
    let key = CString::new("user.tvix.castore.blob.digest").unwrap();
    let want = tvix_virtiofsd::castore::B3Digest::of(b"contents").to_string();
    match fs.getxattr(&ctx, e.inode, &key, 0).unwrap() {
        GetxattrReply::Count(n) => assert_eq!(n as usize, want.len()),
        _ => panic!("size 0 asks for the length"),
    }
    match fs.getxattr(&ctx, e.inode, &key, 100).unwrap() {
        GetxattrReply::Value(v) => assert_eq!(v, want.as_bytes()),
        _ => panic!("expected the value"),
    }
    assert_eq!(errno(fs.getxattr(&ctx, e.inode, &key, 3)), libc::ERANGE);
    let other = CString::new("user.tvix.castore.directory.digest").unwrap();
    assert_eq!(
        errno(fs.getxattr(&ctx, e.inode, &other, 100)),
        libc::ENODATA
    );
    // snix's name for the same attribute, and both listed
    let snix = CString::new("user.snix.castore.blob.digest").unwrap();
    match fs.getxattr(&ctx, e.inode, &snix, 100).unwrap() {
        GetxattrReply::Value(v) => assert_eq!(v, want.as_bytes()),
        _ => panic!("expected the value under snix's name"),
    }
    match fs.listxattr(&ctx, e.inode, 1000).unwrap() {
        fuse_backend_rs::api::filesystem::ListxattrReply::Names(n) => assert_eq!(
            n,
            b"user.tvix.castore.blob.digest\0user.snix.castore.blob.digest\0"
        ),
        _ => panic!("expected the names"),
    }
}

/// A store path's tree larger than the directory cache, from a store over
/// gRPC: the first lookup prefetches only what the cache holds, and a walk
/// of the whole tree still finds every file.
#[test]
fn a_tree_larger_than_the_directory_cache_is_walked_in_full() {
    use tvix_virtiofsd::castore::{Directory, LeavesFirst};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = Store::memory();
    let sp = StorePath::from_basename("00000000000000000000000000000000-big").unwrap();
    let (addr, names) = rt.block_on(async {
        let digest = blob::put_bytes(backend.blob.as_ref(), b"leaf")
            .await
            .unwrap();
        let leaf = Node::File {
            digest,
            size: 4,
            executable: false,
        };
        let mut g = LeavesFirst::new();
        let mut top = Directory::new();
        let mut names = Vec::new();
        for i in 0..300 {
            let mut d = Directory::new();
            for j in 0..8 {
                d.add(format!("f{j}").into(), leaf.clone()).unwrap();
            }
            // distinct directories: each also holds a symlink to its own name
            d.add(
                "me".into(),
                Node::Symlink {
                    target: format!("d{i}").into(),
                },
            )
            .unwrap();
            let node = Node::Directory {
                digest: d.digest(),
                size: d.size(),
            };
            g.add(d).unwrap();
            top.add(format!("d{i:03}").into(), node).unwrap();
            names.push(format!("d{i:03}"));
        }
        let root = Node::Directory {
            digest: top.digest(),
            size: top.size(),
        };
        g.add(top).unwrap();
        backend
            .directory
            .put_graph(g.finish().unwrap())
            .await
            .unwrap();
        backend
            .path_info
            .put(common::bare_path_info(sp.clone(), root))
            .await
            .unwrap();
        (common::serve_in_process(backend.clone(), None).await, names)
    });
    // gRPC channels start their tasks on the runtime they are opened in
    let client = {
        let _rt = rt.enter();
        common::grpc_store(&addr)
    };
    let fs = StoreFs::new(
        client,
        rt.handle().clone(),
        FsConfig {
            dir_cache_bytes: 16 << 10,
            ..Default::default()
        },
    );
    let ctx = Context::default();
    let top = fs
        .lookup(&ctx, ROOT_INO, &CString::new(sp.to_basename()).unwrap())
        .unwrap();
    for name in &names {
        let d = fs
            .lookup(&ctx, top.inode, &CString::new(name.as_str()).unwrap())
            .unwrap();
        for j in 0..8 {
            let f = fs
                .lookup(&ctx, d.inode, &CString::new(format!("f{j}")).unwrap())
                .unwrap();
            assert_eq!(f.attr.st_size, 4, "{name}/f{j}");
        }
    }
}

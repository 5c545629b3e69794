//! The executable file mappings of a process, from `/proc/PID/maps`: which library files
//! (by device and inode, the identity a uprobe is attached to) its code runs from.

/// A file, as the kernel knows it: a uprobe set on it fires in every process mapping it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    /// `major << 32 | minor` of the device, as `/proc/PID/maps` shows it.
    pub dev: u64,
    pub inode: u64,
}

/// One executable mapping of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecMapping {
    pub file: FileId,
    /// The path inside the process's mount namespace (open it through `/proc/PID/root`).
    pub path: String,
}

/// The distinct files mapped executable in a `/proc/PID/maps` text, in first-seen order.
/// Anonymous mappings, deleted files and pseudo-files (`[vdso]`) are left out: no uprobe
/// can be placed on them by path.
pub fn exec_mappings(text: &str) -> Vec<ExecMapping> {
    let mut out: Vec<ExecMapping> = Vec::new();
    for line in text.lines() {
        let Some(m) = parse_line(line) else { continue };
        if !out.iter().any(|o| o.file == m.file) {
            out.push(m);
        }
    }
    out
}

/// `start-end perms offset major:minor inode   path`
fn parse_line(line: &str) -> Option<ExecMapping> {
    let mut f = line.splitn(6, ' ');
    let _range = f.next()?;
    let perms = f.next()?;
    let _offset = f.next()?;
    let dev = f.next()?;
    let inode: u64 = f.next()?.parse().ok()?;
    let path = f.next()?.trim_start();
    if perms.as_bytes().get(2) != Some(&b'x')
        || inode == 0
        || !path.starts_with('/')
        || path.ends_with(" (deleted)")
    {
        return None;
    }
    let (major, minor) = dev.split_once(':')?;
    let dev = (u64::from_str_radix(major, 16).ok()? << 32) | u64::from_str_radix(minor, 16).ok()?;
    Some(ExecMapping { file: FileId { dev, inode }, path: path.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Lines of a gunicorn worker with psycopg's wheel loaded (recorded here).
    const MAPS: &str = "\
55d0c1a00000-55d0c1a6b000 r--p 00000000 fe:01 1311027                    /usr/bin/python3.11
55d0c1a6b000-55d0c1d5b000 r-xp 0006b000 fe:01 1311027                    /usr/bin/python3.11
55d0c2c3e000-55d0c2f91000 rw-p 00000000 00:00 0                          [heap]
7f1b2c000000-7f1b2c021000 rw-p 00000000 00:00 0 
7f1b2d1a0000-7f1b2d1bc000 r--p 00000000 fe:01 2754713                    /work/venv/lib/python3.11/site-packages/psycopg_binary.libs/libssl-6a9b88ec.so.3
7f1b2d1bc000-7f1b2d23b000 r-xp 0001c000 fe:01 2754713                    /work/venv/lib/python3.11/site-packages/psycopg_binary.libs/libssl-6a9b88ec.so.3
7f1b2d300000-7f1b2d37a000 r-xp 00026000 fe:01 1316093                    /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1b2d400000-7f1b2d401000 r-xp 00000000 fe:01 99                         /tmp/gone.so (deleted)
7f1b2d500000-7f1b2d510000 r-xp 00000000 103:02 77                        /opt/app/lib with space.so
7ffc8b3f4000-7ffc8b3f6000 r-xp 00000000 00:00 0                          [vdso]
";

    #[test]
    fn executable_file_mappings_once_each() {
        let m = exec_mappings(MAPS);
        let paths: Vec<&str> = m.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/usr/bin/python3.11",
                "/work/venv/lib/python3.11/site-packages/psycopg_binary.libs/libssl-6a9b88ec.so.3",
                "/usr/lib/x86_64-linux-gnu/libssl.so.3",
                "/opt/app/lib with space.so",
            ]
        );
        assert_eq!(m[0].file, FileId { dev: (0xfe << 32) | 1, inode: 1311027 });
        assert_eq!(m[3].file, FileId { dev: (0x103 << 32) | 2, inode: 77 });
    }

    #[test]
    fn the_agents_own_maps_parse() {
        let text = std::fs::read_to_string("/proc/self/maps").unwrap();
        let m = exec_mappings(&text);
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert!(m.iter().any(|m| std::path::Path::new(&m.path) == exe), "{m:?}");
    }

    proptest! {
        #[test]
        fn any_text_parses_without_panic(text in "[ -~\n]{0,400}") {
            let _ = exec_mappings(&text);
        }
    }
}

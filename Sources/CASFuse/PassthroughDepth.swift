import CLinux

/// How deep the filesystems under the store's files are stacked: the kernel
/// hands a file to passthrough only when its filesystem is stacked less
/// deeply than the mount's `max_stack_depth`. A store on ext4, xfs or tmpfs
/// needs 1; a store on overlayfs or eCryptfs (containers) needs 2, which the
/// kernel allows at most and which leaves no room for a stacking filesystem
/// (overlayfs, eCryptfs) on top of the casfs mount.
public enum PassthroughDepth {
    static let overlayfs: Int = 0x794c_7630
    static let ecryptfs: Int = 0xf15f

    /// The depth a mount needs so that files under `roots` can be passed
    /// through (1 when none is known to be stacked).
    public static func required(forFilesUnder roots: [String]) -> Int {
        var depth = 1
        for root in roots {
            let kind = casfs_filesystem_type(root)
            if kind == overlayfs || kind == ecryptfs { depth = 2 }
        }
        return depth
    }
}

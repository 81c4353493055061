import CASCore
import Foundation
import FuseKernel

/// statfs (`df`): free space and free files are those of the filesystems
/// where blobs land; used space and used files are the index's total size
/// and blob count. Values from outside (a shared Redis's counter, host
/// filesystems) are clamped, never trapping.
extension CASFileSystem {
    /// Free 4 KiB blocks and free files where blobs land: the least over the
    /// space directories (a write must fit in each store it reaches), or the
    /// staging directory's when no store is on a local disk.
    func hostFree() -> (blocks: UInt64, files: UInt64) {
        var blocks = UInt64.max
        var files = UInt64.max
        var seen = false
        for dir in spaceDirectories.isEmpty ? [stagingDirectory] : spaceDirectories {
            var host = statvfs()
            guard statvfs(dir, &host) == 0 else { continue }
            seen = true
            let (bytes, o) = UInt64(host.f_bavail).multipliedReportingOverflow(by: UInt64(host.f_frsize))
            blocks = min(blocks, (o ? UInt64.max : bytes) / 4096)
            // A filesystem without an inode limit reports no files at all.
            if host.f_files > 0 { files = min(files, UInt64(host.f_favail)) }
        }
        guard seen else { return (0, 1 << 32) }
        return (blocks, files == UInt64.max ? 1 << 32 : files)
    }

    func statfs(_ reply: FuseReply) {
        var s = FuseStatfs()
        let (freeBlocks, freeFiles) = hostFree()
        s.blocksFree = freeBlocks
        s.blocksAvailable = freeBlocks
        s.filesFree = freeFiles
        if let index {
            do {
                let used = UInt64(try index.totalSize().blocks(of: 4096))
                let (blocks, o) = used.addingReportingOverflow(freeBlocks)
                s.blocks = o ? UInt64.max : blocks
                let count = UInt64(max(0, index.recentBlobCount(maxAge: 30) ?? 0))
                let (files, o2) = count.addingReportingOverflow(freeFiles)
                s.files = o2 ? UInt64.max : files
            } catch {
                return fail(reply, "statfs", error)
            }
        } else {
            s.blocks = freeBlocks
            s.files = freeFiles
        }
        reply.statfs(s)
    }
}

import CASCore
import Foundation
import REAPI
import SwiftProtobuf
import TestSupport
import XCTest

/// `/tree/<digest>/`: input roots stored with `casfs put --tree` (or built
/// here, blob by blob) and read through a real mount with shell tools.
final class TreeMountTests: MountTestCase {
    /// A source tree with every node kind: nested and empty directories,
    /// executables, relative and absolute symlinks, odd names, two identical
    /// subtrees, and one file big enough to be read in several requests.
    func makeSourceTree() throws -> String {
        let src = tmp + "/srctree"
        let script = """
            set -e
            mkdir -p \(shq(src)) && cd \(shq(src))
            mkdir -p a/b/c empty 'with space' dup1/x dup2/x
            echo hello > hello.txt
            cp hello.txt a/same-as-hello.txt
            printf '#!/bin/sh\\necho "ran with $1"\\n' > run.sh && chmod 755 run.sh
            cp hello.txt hello-exec && chmod 755 hello-exec
            echo deep > a/b/c/deep.txt
            printf 'caf\\303\\251\\n' > 'caf\u{e9}.txt'
            echo spaced > 'with space/file name.txt'
            echo twin > dup1/x/t.txt && echo twin > dup2/x/t.txt
            head -c 3145728 /dev/urandom > a/big.bin
            ln -s hello.txt link-rel
            ln -s ../../../hello.txt a/b/c/up
            ln -s /etc/hostname link-abs
            ln -s a/b dirlink
            """
        mustSh(script)
        return src
    }

    /// `casfs put --tree` into the mount's store; returns the root digest.
    func putTree(_ dir: String, config: String) throws -> Digest {
        let out = mustSh("\(shq(try casfsBinary())) put --quiet --tree --config \(shq(config)) \(shq(dir))")
        let fields = out.split(separator: " ", omittingEmptySubsequences: true)
        XCTAssertEqual(fields.count, 2, out)
        XCTAssertEqual(fields.last.map { String($0).trimmingCharacters(in: .newlines) }, dir)
        let first = try XCTUnwrap(fields.first.map(String.init))
        XCTAssertTrue(first.hasPrefix("tree/"), out)
        return try Digest.parse(first.dropFirst(5))
    }

    func testPutTreeReadsBackIdenticallyWithModesLinksAndSharedInodes() throws {
        let m = try mount(try cachedIndexedConfig(writable: true))
        let src = try makeSourceTree()
        let root = try putTree(src, config: m.configPath)
        let tree = m.mountpoint + "/tree/\(root)"

        // Same bytes, same names, same symlinks, same directories.
        XCTAssertEqual(sh("diff -r --no-dereference \(shq(src)) \(shq(tree))").stdout, "")
        XCTAssertTrue(sh("diff -r --no-dereference \(shq(src)) \(shq(tree))").ok)
        XCTAssertEqual(mustSh("cd \(shq(tree)) && find . | sort"), mustSh("cd \(shq(src)) && find . | sort"))
        XCTAssertEqual(mustSh("cd \(shq(tree)) && find . -type f | sort | xargs -d '\\n' sha256sum"),
                       mustSh("cd \(shq(src)) && find . -type f | sort | xargs -d '\\n' sha256sum"))

        // Modes: 0444 files, 0555 executables and directories, symlinks as links.
        XCTAssertEqual(mustSh("stat -c '%a %F' \(shq(tree + "/hello.txt")) \(shq(tree + "/run.sh")) \(shq(tree + "/a")) \(shq(tree + "/empty")) \(shq(tree + "/link-rel"))"),
                       "444 regular file\n555 regular file\n555 directory\n555 directory\n777 symbolic link\n")
        XCTAssertEqual(mustSh("cd \(shq(tree)) && find . -type f -perm -u+x | sort"), "./hello-exec\n./run.sh\n")
        XCTAssertEqual(mustSh("readlink \(shq(tree + "/a/b/c/up")) \(shq(tree + "/link-abs")) \(shq(tree + "/dirlink"))"),
                       "../../../hello.txt\n/etc/hostname\na/b\n")
        // The kernel resolves symlinks, from the caller's view.
        XCTAssertEqual(mustSh("cat \(shq(tree + "/a/b/c/up")) \(shq(tree + "/dirlink/c/deep.txt"))"), "hello\ndeep\n")
        XCTAssertEqual(mustSh("ls \(shq(tree + "/empty")) | wc -l").trimmingCharacters(in: .whitespaces), "0\n")

        // A plain file is the blob's own inode (one page cache); an executable
        // with the same bytes is another inode.
        let hello = Digest.of(Data("hello\n".utf8))
        let inodes = mustSh("stat -c %i \(shq(tree + "/hello.txt")) \(shq(tree + "/a/same-as-hello.txt")) \(shq(m.path(hello))) \(shq(tree + "/hello-exec"))")
            .split(separator: "\n").map(String.init)
        XCTAssertEqual(inodes.count, 4)
        XCTAssertEqual(Set(inodes[0..<3]).count, 1, "\(inodes)")
        XCTAssertNotEqual(inodes[3], inodes[0])
        // Two identical subtrees are two directories (one digest, two paths).
        XCTAssertEqual(mustSh("getfattr --only-values -n user.casfs.digest \(shq(tree + "/dup1"))"),
                       mustSh("getfattr --only-values -n user.casfs.digest \(shq(tree + "/dup2"))"))
        XCTAssertNotEqual(mustSh("stat -c %i \(shq(tree + "/dup1/x"))"), mustSh("stat -c %i \(shq(tree + "/dup2/x"))"))
        XCTAssertEqual(mustSh("cat \(shq(tree + "/dup1/x/t.txt")) \(shq(tree + "/dup2/x/t.txt"))"), "twin\ntwin\n")
        XCTAssertEqual(mustSh("getfattr --only-values -n user.casfs.digest \(shq(tree))"), root.description)
        XCTAssertEqual(mustSh("getfattr --only-values -n user.casfs.digest \(shq(tree + "/hello.txt"))"), hello.description)

        // An executable from the tree runs.
        XCTAssertEqual(mustSh("\(shq(tree + "/run.sh")) x"), "ran with x\n")

        // Nothing in a tree can be changed, even on a writable mount.
        for cmd in ["touch \(shq(tree + "/new"))", "mkdir \(shq(tree + "/d"))", "rm -f \(shq(tree + "/hello.txt"))",
                    "rmdir \(shq(tree + "/empty"))", "mv \(shq(tree + "/hello.txt")) \(shq(tree + "/h2"))",
                    "ln -s x \(shq(tree + "/l2"))", "echo x > \(shq(tree + "/run.sh"))",
                    "chmod 777 \(shq(tree + "/run.sh"))", "setfattr -n user.x -v 1 \(shq(tree + "/a"))"] {
            let r = sh(cmd)
            XCTAssertFalse(r.ok, "\(cmd) succeeded")
            XCTAssertTrue(r.stderr.contains("not permitted") || r.stderr.contains("Read-only"), "\(cmd): \(r)")
        }
        XCTAssertEqual(sh("diff -r --no-dereference \(shq(src)) \(shq(tree))").stdout, "")

        // Listing /tree itself shows nothing (trees are found by digest).
        XCTAssertEqual(mustSh("ls -a \(shq(m.mountpoint + "/tree"))"), ".\n..\n")
        XCTAssertEqual(mustSh("ls \(shq(m.mountpoint))"), "sha256\ntree\n")
    }

    func testReadOnlyMountAndKernelCaching() throws {
        let m = try mount(try cachedIndexedConfig(writable: false))
        let src = try makeSourceTree()
        let root = try putTree(src, config: m.configPath)
        let tree = m.mountpoint + "/tree/\(root)"
        for cmd in ["touch \(shq(tree + "/new"))", "rm -f \(shq(tree + "/hello.txt"))", "echo x > \(shq(tree + "/hello.txt"))"] {
            let r = sh(cmd)
            XCTAssertFalse(r.ok, cmd)
            XCTAssertTrue(r.stderr.contains("Read-only file system"), "\(cmd): \(r)")
        }
        // The tree is immutable: once listed, the kernel answers again without the daemon.
        let first = mustSh("ls -lR \(shq(tree))")
        let before = try m.stats()
        XCTAssertEqual(mustSh("ls -lR \(shq(tree))"), first)
        XCTAssertEqual(mustSh("stat \(shq(tree + "/no-such-name")) 2>&1 >/dev/null | grep -c 'No such file'"), "1\n")
        let mid = try m.stats()
        XCTAssertEqual(mustSh("stat \(shq(tree + "/no-such-name")) 2>&1 >/dev/null | grep -c 'No such file'"), "1\n")
        XCTAssertEqual(mustSh("ls -lR \(shq(tree))"), first)
        let after = try m.stats()
        XCTAssertEqual(after["casfs_fuse_requests_total{op=\"lookup\"}"], mid["casfs_fuse_requests_total{op=\"lookup\"}"], "negative entries in a tree are cached")
        XCTAssertEqual(mid["casfs_fuse_requests_total{op=\"lookup\"}"]! - before["casfs_fuse_requests_total{op=\"lookup\"}"]!, 1, "only the new name was looked up")
        XCTAssertGreaterThan(after["casfs_tree_directories_cached"] ?? 0, 5)
        // Listing the directories hinted the storage to fetch their small files in bulk.
        XCTAssertTrue(pollUntil(30) { ((try? m.stats())?["casfs_prefetched_blobs_total"] ?? 0) > 5 },
                      "prefetched: \(String(describing: try? m.stats()["casfs_prefetched_blobs_total"]))")
    }

    // MARK: malformed trees

    typealias PBDirectory = Build_Bazel_Remote_Execution_V2_Directory

    func pb(_ d: Digest) -> Build_Bazel_Remote_Execution_V2_Digest { .with { $0.hash = d.hash; $0.sizeBytes = d.size } }

    /// Stores bytes through the mount (cp into /sha256) and returns their digest.
    func store(_ data: Data, _ m: CasfsMount) throws -> Digest {
        let (path, d) = try localBlob(data)
        mustSh("cp \(shq(path)) \(shq(m.path(d)))")
        return d
    }

    func store(_ dir: PBDirectory, _ m: CasfsMount) throws -> Digest {
        try store(try dir.serializedBytes(), m)
    }

    /// Anyone who can stat the mount can ask for a bad tree again and again:
    /// the log says it once (with its digest), then counts.
    func testLookupsOfAnInvalidTreeDoNotFloodTheLog() throws {
        let m = try mount(try cachedIndexedConfig(writable: true))
        let bad = try store(Data("not a Directory\n".utf8), m)
        let path = m.mountpoint + "/tree/\(bad)"
        mustSh("for i in $(seq 2000); do stat \(shq(path)) 2>/dev/null; done; true")
        XCTAssertEqual(try m.stats()["casfs_fuse_errors_total"] ?? 0 >= 2000, true, "each lookup failed")
        XCTAssertEqual(m.log.components(separatedBy: "tree \(bad): not a REAPI Directory").count - 1, 1, m.log.suffix(2000).description)
        XCTAssertTrue(sh("ls \(shq(path))").stderr.contains("Input/output error"))
    }

    func testMalformedDirectoriesAreErrorsAndTheMountKeepsServing() throws {
        let m = try mount(try cachedIndexedConfig(writable: true))
        let content = try store(Data("content\n".utf8), m)
        func fileNode(_ name: String) -> Build_Bazel_Remote_Execution_V2_FileNode {
            .with { $0.name = name; $0.digest = pb(content) }
        }
        func dirNode(_ name: String, _ d: Digest) -> Build_Bazel_Remote_Execution_V2_DirectoryNode {
            .with { $0.name = name; $0.digest = pb(d) }
        }
        func linkNode(_ name: String, _ target: String) -> Build_Bazel_Remote_Execution_V2_SymlinkNode {
            .with { $0.name = name; $0.target = target }
        }
        let good = try store(PBDirectory.with { $0.files = [fileNode("f")] }, m)

        var bad: [(String, Digest)] = []
        bad.append(("not protobuf", try store(Data("just some text\n".utf8), m)))
        bad.append(("garbage", try store(Data([0xff, 0xfe, 0x01, 0x02]), m)))
        var unknown = try PBDirectory.with { $0.files = [fileNode("f")] }.serializedBytes() as Data
        unknown += Data([0x48, 0x01])
        bad.append(("unknown field", try store(unknown, m)))
        bad.append(("slash", try store(PBDirectory.with { $0.files = [fileNode("a/b")] }, m)))
        bad.append(("dot", try store(PBDirectory.with { $0.files = [fileNode(".")] }, m)))
        bad.append(("dotdot", try store(PBDirectory.with { $0.directories = [dirNode("..", good)] }, m)))
        bad.append(("empty name", try store(PBDirectory.with { $0.files = [fileNode("")] }, m)))
        bad.append(("duplicate", try store(PBDirectory.with { $0.files = [fileNode("a"), fileNode("a")] }, m)))
        bad.append(("duplicate across kinds", try store(PBDirectory.with {
            $0.files = [fileNode("a")]
            $0.symlinks = [linkNode("a", "x")]
        }, m)))
        bad.append(("unsorted", try store(PBDirectory.with { $0.files = [fileNode("b"), fileNode("a")] }, m)))
        bad.append(("bad child digest", try store(PBDirectory.with {
            $0.files = [.with { $0.name = "f"; $0.digest = .with { $0.hash = "XYZ"; $0.sizeBytes = 1 } }]
        }, m)))
        bad.append(("empty symlink target", try store(PBDirectory.with { $0.symlinks = [linkNode("l", "")] }, m)))

        for (what, d) in bad {
            let r = sh("ls \(shq(m.mountpoint + "/tree/\(d)"))")
            XCTAssertFalse(r.ok, what)
            XCTAssertTrue(r.stderr.contains("Input/output error"), "\(what): \(r)")
            XCTAssertTrue(m.log.contains("tree \(d)"), "\(what): the log names the digest")
        }

        // Absent: the root, and a child directory of a valid tree.
        let absent = Digest.of(Data("never stored".utf8))
        XCTAssertTrue(sh("ls \(shq(m.mountpoint + "/tree/\(absent)")) 2>&1").stdout.contains("No such file"))
        XCTAssertTrue(sh("ls \(shq(m.mountpoint + "/tree/not-a-digest")) 2>&1").stdout.contains("No such file"))
        let badSub = bad[3].1
        let parent = try store(PBDirectory.with {
            $0.files = [fileNode("f")]
            $0.directories = [dirNode("broken", badSub), dirNode("gone", absent), dirNode("ok", good)]
            $0.symlinks = [linkNode("escape", "../../../../../../etc/passwd")]
        }, m)
        let p = m.mountpoint + "/tree/\(parent)"
        XCTAssertEqual(mustSh("ls \(shq(p))"), "broken\nescape\nf\ngone\nok\n")
        XCTAssertTrue(sh("ls \(shq(p + "/gone")) 2>&1").stdout.contains("No such file"))
        XCTAssertTrue(sh("ls \(shq(p + "/broken")) 2>&1").stdout.contains("Input/output error"))
        XCTAssertEqual(mustSh("cat \(shq(p + "/ok/f"))"), "content\n")
        // A symlink is text for the kernel to resolve; the daemon never follows it.
        XCTAssertEqual(mustSh("readlink \(shq(p + "/escape"))"), "../../../../../../etc/passwd\n")

        // A file whose blob is absent is listed (the tree says so) but cannot be read.
        let missingFile = try store(PBDirectory.with {
            $0.files = [.with { $0.name = "lost"; $0.digest = pb(absent) }]
        }, m)
        let lost = m.mountpoint + "/tree/\(missingFile)/lost"
        XCTAssertEqual(mustSh("stat -c %s \(shq(lost))"), "\(absent.size)\n")
        XCTAssertTrue(sh("cat \(shq(lost)) 2>&1").stdout.contains("Input/output error"))

        // After all that, the mount still serves.
        XCTAssertTrue(m.isRunning)
        XCTAssertEqual(mustSh("cat \(shq(m.path(content)))"), "content\n")
        XCTAssertEqual(mustSh("cat \(shq(m.mountpoint + "/tree/\(good)/f"))"), "content\n")
    }

    func testNodePropertiesAreShown() throws {
        let m = try mount(try cachedIndexedConfig(writable: false), name: "ro")
        let rw = try mount(try cachedIndexedConfig(writable: true), name: "rw")
        let (path, content) = try localBlob(Data("props\n".utf8))
        mustSh("cp \(shq(path)) \(shq(rw.path(content)))")
        var dir = PBDirectory()
        dir.files = [.with {
            $0.name = "f"
            $0.digest = pb(content)
            $0.nodeProperties.mtime = .with { $0.seconds = 1_500_000_000; $0.nanos = 250_000_000 }
            $0.nodeProperties.unixMode = .with { $0.value = 0o104750 }  // setuid is never shown
        }]
        dir.symlinks = [.with {
            $0.name = "l"
            $0.target = "f"
            $0.nodeProperties.mtime = .with { $0.seconds = 1_400_000_000 }
        }]
        dir.nodeProperties.unixMode = .with { $0.value = 0o750 }
        let (dpath, d) = try localBlob(try dir.serializedBytes())
        mustSh("cp \(shq(dpath)) \(shq(rw.path(d)))")
        let t = m.mountpoint + "/tree/\(d)"
        XCTAssertEqual(mustSh("stat -c '%a %Y %y' \(shq(t + "/f"))"), "750 1500000000 2017-07-14 02:40:00.250000000 +0000\n")
        XCTAssertEqual(mustSh("stat -c '%a %Y' \(shq(t))"), "750 946684800\n")
        XCTAssertEqual(mustSh("stat -c '%Y' \(shq(t + "/l"))"), "1400000000\n")
        XCTAssertEqual(mustSh("cat \(shq(t + "/l"))"), "props\n")
    }

    func testPutTreeRefusesWhatATreeCannotHold() throws {
        let m = try mount(try cachedIndexedConfig(writable: false))
        let bin = try casfsBinary()
        let fifoTree = tmp + "/with-fifo"
        mustSh("mkdir -p \(shq(fifoTree + "/sub")) && echo ok > \(shq(fifoTree + "/a")) && mkfifo \(shq(fifoTree + "/sub/pipe"))")
        var r = sh("\(shq(bin)) put --quiet --tree --config \(shq(m.configPath)) \(shq(fifoTree))")
        XCTAssertFalse(r.ok)
        XCTAssertEqual(r.stdout, "", "no root digest is printed")
        XCTAssertTrue(r.stderr.contains("\(fifoTree)/sub/pipe: a socket, FIFO or device cannot be part of an input root"), r.stderr)

        let badName = tmp + "/bad-name"
        mustSh("mkdir -p \(shq(badName)) && touch \(shq(badName))/$(printf 'x\\377y')")
        r = sh("\(shq(bin)) put --quiet --tree --config \(shq(m.configPath)) \(shq(badName))")
        XCTAssertFalse(r.ok)
        XCTAssertEqual(r.stdout, "")
        XCTAssertTrue(r.stderr.contains("is not valid UTF-8"), r.stderr)

        r = sh("\(shq(bin)) put --quiet --tree --config \(shq(m.configPath)) \(shq(fifoTree + "/a"))")
        XCTAssertFalse(r.ok)
        XCTAssertTrue(r.stderr.contains("not a directory"), r.stderr)
    }

    // MARK: a large tree

    func testTenThousandFileTree() throws {
        let m = try mount(try cachedIndexedConfig(writable: false))
        let src = tmp + "/big"
        // 100 directories of 100 files, 1–4 KiB each, distinct contents; a few executables.
        let py = """
            import os, random
            r = random.Random(7)
            root = "\(src)"
            for d in range(100):
                p = os.path.join(root, "d%03d" % d)
                os.makedirs(p)
                for f in range(100):
                    fp = os.path.join(p, "f%03d.dat" % f)
                    with open(fp, "wb") as out:
                        out.write(r.randbytes(r.randint(1024, 4096)))
                    if f % 25 == 0:
                        os.chmod(fp, 0o755)
            """
        mustSh("python3 -c \(shq(py))")
        let root = try putTree(src, config: m.configPath)
        let tree = m.mountpoint + "/tree/\(root)"
        XCTAssertEqual(mustSh("find \(shq(tree)) -type f | wc -l").trimmingCharacters(in: .whitespaces), "10000\n")
        // Everything reads back: the same bytes, in the same order.
        XCTAssertEqual(mustSh("cd \(shq(tree)) && find . -type f | sort | xargs cat | sha256sum"),
                       mustSh("cd \(shq(src)) && find . -type f | sort | xargs cat | sha256sum"))
        XCTAssertEqual(mustSh("cd \(shq(tree)) && find . -type f | sort | xargs sha256sum"),
                       mustSh("cd \(shq(src)) && find . -type f | sort | xargs sha256sum"))
        XCTAssertEqual(mustSh("cd \(shq(tree)) && find . -type f -perm -u+x | wc -l").trimmingCharacters(in: .whitespaces), "400\n")
    }
}

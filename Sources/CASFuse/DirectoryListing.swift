import CASCore
import CASTree
import Dispatch
import Synchronization

/// readdir offsets of /sha256. The kernel resumes a listing from the offset of
/// the last entry it consumed, so each offset names the position of the *next*
/// entry: (SCAN cursor of its page, index in that page). Re-reading a page
/// from the same cursor gives the same entries while the index is unchanged,
/// and the open directory keeps its last page, so offsets stay stable.
enum ListingPosition: Equatable {
    /// Nothing emitted yet ("." comes next).
    case start
    /// "." emitted, ".." next.
    case afterDot
    /// Entry `index` of the page at `cursor` comes next.
    case entry(cursor: UInt64, index: Int)
    /// Listing finished.
    case end

    static let indexBits = 20
    static let endOffset = Int64.max
    /// Largest cursor that fits in an offset.
    static let maxCursor: UInt64 = (UInt64(1) << (62 - UInt64(indexBits))) - 1

    init(offset: Int64) {
        switch offset {
        case 0: self = .start
        case 1: self = .afterDot
        case ListingPosition.endOffset: self = .end
        case ..<0:
            // The kernel never sends one; a forged request ends the listing.
            self = .end
        default:
            let p = UInt64(offset - 2)
            self = .entry(cursor: p >> UInt64(ListingPosition.indexBits),
                          index: Int(p & ((1 << UInt64(ListingPosition.indexBits)) - 1)))
        }
    }

    /// nil when the position cannot be encoded (cursor or index too large).
    var offset: Int64? {
        switch self {
        case .start: return 0
        case .afterDot: return 1
        case .end: return ListingPosition.endOffset
        case .entry(let c, let i):
            guard c <= ListingPosition.maxCursor, i >= 0, i < (1 << ListingPosition.indexBits) else { return nil }
            return Int64((c << UInt64(ListingPosition.indexBits)) | UInt64(i)) + 2
        }
    }
}

/// State of one open directory: the last index page fetched, or the tree listed.
final class DirectoryHandle: Sendable {
    struct Page {
        var cursor: UInt64
        var digests: [Digest]
        var next: UInt64
    }

    let inode: UInt64
    /// For a directory of a tree: its Directory, as loaded at opendir.
    let tree: TreeDirectory?
    private let lastPage = Mutex<Page?>(nil)

    init(inode: UInt64, tree: TreeDirectory? = nil) {
        self.inode = inode
        self.tree = tree
    }

    /// The page at `cursor`, from the handle's memory or from the index.
    func page(at cursor: UInt64, index: any BlobIndex, count: Int) throws -> Page {
        if let p = lastPage.withLock({ $0 }), p.cursor == cursor { return p }
        let (next, digests) = try index.listPage(cursor: cursor, count: count)
        let p = Page(cursor: cursor, digests: digests, next: next)
        lastPage.withLock { $0 = p }
        return p
    }
}

/// Index pages of /sha256 for listings that have no directory handle (an
/// open-less mount): a small cache keyed by SCAN cursor, so the kernel's
/// resumed reads see the same page; a listing from the start fetches anew.
final class ListingPages: Sendable {
    private let state = Mutex<[UInt64: (page: DirectoryHandle.Page, at: UInt64)]>([:])
    static let capacity = 64
    static let maxAgeNanoseconds: UInt64 = 30_000_000_000

    func page(at cursor: UInt64, fresh: Bool, index: any BlobIndex, count: Int) throws -> DirectoryHandle.Page {
        let now = DispatchTime.now().uptimeNanoseconds
        if !fresh, let hit = state.withLock({ $0[cursor] }), now &- hit.at < Self.maxAgeNanoseconds { return hit.page }
        let (next, digests) = try index.listPage(cursor: cursor, count: count)
        let page = DirectoryHandle.Page(cursor: cursor, digests: digests, next: next)
        state.withLock { s in
            if s.count >= Self.capacity, let oldest = s.min(by: { $0.value.at < $1.value.at })?.key { s[oldest] = nil }
            s[cursor] = (page, now)
        }
        return page
    }
}

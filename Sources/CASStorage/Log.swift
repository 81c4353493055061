import Logging

/// The storage stack's logger.
let log = Logger(label: "casfs.storage")

import Foundation

/// BuildGrid's scalar tags, with BuildGrid's meaning (its config parser is
/// the reference): `!expand-vars` expands `$NAME` and `${NAME}` from the
/// environment (undefined ones stay as written), `!expand-path` expands a
/// leading `~` or `~user` and then variables, and `!read-file` reads the file
/// so named (expanded like a path) and gives its text with every line break
/// doubled and surrounding white space trimmed, as BuildGrid does.
enum ScalarTag: String {
    case expandVars = "!expand-vars"
    case expandPath = "!expand-path"
    case readFile = "!read-file"

    struct Failure: Error { let message: String }

    func apply(_ text: String, environment: [String: String]) throws(Failure) -> String {
        switch self {
        case .expandVars:
            return expandVariables(text, environment)
        case .expandPath:
            return expandVariables(expandUser(text, environment), environment)
        case .readFile:
            let path = expandVariables(expandUser(text, environment), environment)
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
                throw Failure(message: "!read-file: \(path) does not exist")
            }
            guard !isDir.boolValue else { throw Failure(message: "!read-file: \(path) is a directory") }
            guard let data = FileManager.default.contents(atPath: path) else {
                throw Failure(message: "!read-file: cannot read \(path)")
            }
            guard let content = String(data: data, encoding: .utf8) else {
                throw Failure(message: "!read-file: \(path) is not UTF-8 text")
            }
            return readFileText(content)
        }
    }
}

/// `${NAME}` and `$NAME` (NAME: letters, digits, `_`) from `env`; names that
/// are not set, and a `$` that starts no name, are left as written.
func expandVariables(_ s: String, _ env: [String: String]) -> String {
    guard s.contains("$") else { return s }
    let chars = Array(s.unicodeScalars)
    var out = String.UnicodeScalarView()
    var i = 0
    func isWord(_ c: Unicode.Scalar) -> Bool { c == "_" || c.properties.isAlphabetic || c.properties.numericType != nil }
    while i < chars.count {
        let c = chars[i]
        guard c == "$", i + 1 < chars.count else {
            out.append(c)
            i += 1
            continue
        }
        var name = String.UnicodeScalarView()
        var end = i + 1
        if chars[i + 1] == "{" {
            var j = i + 2
            while j < chars.count, chars[j] != "}" { name.append(chars[j]); j += 1 }
            guard j < chars.count else {  // no closing brace: not a reference
                out.append(c)
                i += 1
                continue
            }
            end = j + 1
        } else {
            var j = i + 1
            while j < chars.count, isWord(chars[j]) { name.append(chars[j]); j += 1 }
            end = j
        }
        if !name.isEmpty, let value = env[String(name)] {
            out.append(contentsOf: value.unicodeScalars)
        } else {
            out.append(contentsOf: chars[i..<end])
        }
        i = end
    }
    return String(out)
}

/// A leading `~` (the home directory) or `~user`; anything else unchanged.
func expandUser(_ s: String, _ env: [String: String]) -> String {
    guard s.hasPrefix("~") else { return s }
    let rest = s.dropFirst()
    let user = rest.prefix { $0 != "/" }
    let tail = rest.dropFirst(user.count)
    if user.isEmpty {
        if let home = env["HOME"] { return home + tail }
        guard let pw = getpwuid(getuid()) else { return s }
        return String(cString: pw.pointee.pw_dir) + tail
    }
    guard let pw = getpwnam(String(user)) else { return s }
    return String(cString: pw.pointee.pw_dir) + tail
}

/// The text `!read-file` gives: lines joined with an extra line break (each
/// keeps its own), then trimmed.
func readFileText(_ content: String) -> String {
    let normalized = content.replacingOccurrences(of: "\r\n", with: "\n").replacingOccurrences(of: "\r", with: "\n")
    var lines: [Substring] = []
    var start = normalized.startIndex
    while start < normalized.endIndex {
        if let nl = normalized[start...].firstIndex(of: "\n") {
            lines.append(normalized[start...nl])
            start = normalized.index(after: nl)
        } else {
            lines.append(normalized[start...])
            break
        }
    }
    return lines.joined(separator: "\n").trimmingCharacters(in: .whitespacesAndNewlines)
}

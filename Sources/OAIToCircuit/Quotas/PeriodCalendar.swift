/// UTC calendar arithmetic for periodic limits: days and months as plain integers, so the request path never needs
/// Foundation's `Calendar`. Days count from 1970-01-01; months are `year * 12 + (month - 1)`.
public enum PeriodCalendar {
    static let secondsPerDay = 86_400.0

    /// The UTC day `epochSeconds` falls on.
    public static func day(_ epochSeconds: Double) -> Int {
        Int((epochSeconds / secondsPerDay).rounded(.down))
    }

    /// The month a day falls in.
    public static func month(ofDay day: Int) -> Int {
        let (year, month, _) = civil(day)
        return year * 12 + (month - 1)
    }

    /// The first day of a month.
    public static func firstDay(ofMonth month: Int) -> Int {
        days(year: month / 12, month: month % 12 + 1, day: 1)
    }

    /// When the period holding `epochSeconds` ends, in epoch seconds; `nil` for `lifetime`.
    public static func end(of period: QuotaPeriod, at epochSeconds: Double) -> Double? {
        let today = day(epochSeconds)
        switch period {
        case .lifetime: return nil
        case .daily: return Double(today + 1) * secondsPerDay
        case .monthly: return Double(firstDay(ofMonth: month(ofDay: today) + 1)) * secondsPerDay
        }
    }

    /// `YYYY-MM-DD`.
    public static func dayString(_ day: Int) -> String {
        formatted(capacity: 15) { digits in digits.date(day) }
    }

    /// `YYYY-MM`, as the earlier bridge's `monthly_usage.usage_month`.
    public static func monthString(_ month: Int) -> String {
        formatted(capacity: 15) { digits in
            digits.number(month / 12, width: 4)
            digits.byte("-")
            digits.number(month % 12 + 1, width: 2)
        }
    }

    /// ISO 8601 in UTC with microseconds, as Splunk events carry it: `2026-11-29T10:30:45.123456Z`.
    public static func timestamp(_ epochSeconds: Double) -> String {
        let micros = Int64((epochSeconds * 1_000_000).rounded())
        let secondsOfEpoch = micros >= 0 ? micros / 1_000_000 : (micros - 999_999) / 1_000_000
        let fraction = Int(micros - secondsOfEpoch * 1_000_000)
        let day = Int(secondsOfEpoch >= 0 ? secondsOfEpoch / 86_400 : (secondsOfEpoch - 86_399) / 86_400)
        let secondOfDay = Int(secondsOfEpoch - Int64(day) * 86_400)
        return formatted(capacity: 40) { digits in
            digits.date(day)
            digits.byte("T")
            digits.number(secondOfDay / 3600, width: 2)
            digits.byte(":")
            digits.number(secondOfDay / 60 % 60, width: 2)
            digits.byte(":")
            digits.number(secondOfDay % 60, width: 2)
            digits.byte(".")
            digits.number(fraction, width: 6)
            digits.byte("Z")
        }
    }

    /// Parses `YYYY-MM-DD` into a day.
    public static func day(parsing text: String) -> Int? {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0].count == 4, parts[1].count == 2, parts[2].count == 2,
            let year = Int(parts[0]), let month = Int(parts[1]), let dayOfMonth = Int(parts[2]),
            (1...12).contains(month), (1...daysIn(year: year, month: month)).contains(dayOfMonth)
        else { return nil }
        return days(year: year, month: month, day: dayOfMonth)
    }

    /// Parses `YYYY-MM` into a month.
    public static func month(parsing text: String) -> Int? {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2, parts[0].count == 4, parts[1].count == 2, let year = Int(parts[0]),
            let month = Int(parts[1]), (1...12).contains(month)
        else { return nil }
        return year * 12 + (month - 1)
    }

    static func daysIn(year: Int, month: Int) -> Int {
        let next = month == 12 ? days(year: year + 1, month: 1, day: 1) : days(year: year, month: month + 1, day: 1)
        return next - days(year: year, month: month, day: 1)
    }

    /// A string of at most `capacity` ASCII bytes written in place, so a date costs one allocation (none up to 15
    /// bytes, a small string) rather than one per piece; the ledger entry and the Splunk event of every request
    /// format three. A year too large for the capacity (never a real clock's) is cut short, never written past it.
    private static func formatted(capacity: Int, _ write: (inout Digits) -> Void) -> String {
        String(unsafeUninitializedCapacity: capacity) { buffer in
            var digits = Digits(buffer: buffer)
            write(&digits)
            return digits.count
        }
    }

    /// Writes ASCII into a string's uninitialized bytes; anything past the buffer's end is dropped, never written.
    private struct Digits {
        let buffer: UnsafeMutableBufferPointer<UInt8>
        private(set) var count = 0

        init(buffer: UnsafeMutableBufferPointer<UInt8>) {
            self.buffer = buffer
        }

        mutating func byte(_ character: Unicode.Scalar) {
            guard count < buffer.count else { return }
            buffer[count] = UInt8(ascii: character)
            count += 1
        }

        /// `value` in decimal, zero-padded to `width` digits (more when it needs them; a minus sign first if negative).
        mutating func number(_ value: Int, width: Int) {
            if value < 0 { byte("-") }
            var magnitude = value.magnitude
            var length = 1
            var rest = magnitude / 10
            while rest > 0 {
                length += 1
                rest /= 10
            }
            length = max(length, width)
            guard count + length <= buffer.count else { return }
            for index in stride(from: count + length - 1, through: count, by: -1) {
                buffer[index] = UInt8(ascii: "0") + UInt8(magnitude % 10)
                magnitude /= 10
            }
            count += length
        }

        /// `YYYY-MM-DD` of a day since 1970-01-01.
        mutating func date(_ day: Int) {
            let (year, month, dayOfMonth) = PeriodCalendar.civil(day)
            number(year, width: 4)
            byte("-")
            number(month, width: 2)
            byte("-")
            number(dayOfMonth, width: 2)
        }
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (the well-known era-based algorithm).
    static func days(year: Int, month: Int, day: Int) -> Int {
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yearOfEra = y - era * 400
        let dayOfYear = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1
        let dayOfEra = yearOfEra * 365 + yearOfEra / 4 - yearOfEra / 100 + dayOfYear
        return era * 146_097 + dayOfEra - 719_468
    }

    /// The date of a day since 1970-01-01.
    static func civil(_ days: Int) -> (year: Int, month: Int, day: Int) {
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let shiftedMonth = (5 * dayOfYear + 2) / 153
        let day = dayOfYear - (153 * shiftedMonth + 2) / 5 + 1
        let month = shiftedMonth < 10 ? shiftedMonth + 3 : shiftedMonth - 9
        return (yearOfEra + era * 400 + (month <= 2 ? 1 : 0), month, day)
    }
}

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
        let (year, month, dayOfMonth) = civil(day)
        return "\(padded(year, 4))-\(padded(month, 2))-\(padded(dayOfMonth, 2))"
    }

    /// `YYYY-MM`, as the earlier bridge's `monthly_usage.usage_month`.
    public static func monthString(_ month: Int) -> String {
        "\(padded(month / 12, 4))-\(padded(month % 12 + 1, 2))"
    }

    /// ISO 8601 in UTC with microseconds, as Splunk events carry it: `2026-11-29T10:30:45.123456Z`.
    public static func timestamp(_ epochSeconds: Double) -> String {
        let micros = Int64((epochSeconds * 1_000_000).rounded())
        let secondsOfEpoch = micros >= 0 ? micros / 1_000_000 : (micros - 999_999) / 1_000_000
        let fraction = Int(micros - secondsOfEpoch * 1_000_000)
        let day = Int(secondsOfEpoch >= 0 ? secondsOfEpoch / 86_400 : (secondsOfEpoch - 86_399) / 86_400)
        let secondOfDay = Int(secondsOfEpoch - Int64(day) * 86_400)
        return dayString(day) + "T" + padded(secondOfDay / 3600, 2) + ":" + padded(secondOfDay / 60 % 60, 2) + ":"
            + padded(secondOfDay % 60, 2) + "." + padded(fraction, 6) + "Z"
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

    private static func padded(_ value: Int, _ width: Int) -> String {
        let text = String(value)
        return String(repeating: "0", count: max(0, width - text.count)) + text
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

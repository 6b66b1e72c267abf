//! Aligned tables that fit a width: when the table is wider, the widest of the columns that
//! may shrink loses a character at a time (cells cut with `…`) until it fits, or until every
//! shrinkable column is three characters wide. Without a width (not a terminal), nothing is
//! cut.

/// The narrowest a shrinkable column becomes (its header is cut too when longer).
const MIN_WIDTH: usize = 3;

/// The gap between columns.
const GAP: &str = "  ";

/// A column: its header and whether it may be cut to fit.
pub(super) struct Column {
    header: &'static str,
    shrinkable: bool,
}

impl Column {
    /// A column that is never cut (ids, statuses).
    pub(super) fn fixed(header: &'static str) -> Column {
        Column {
            header,
            shrinkable: false,
        }
    }

    /// A column that may be cut to fit the width.
    pub(super) fn shrinkable(header: &'static str) -> Column {
        Column {
            header,
            shrinkable: true,
        }
    }
}

/// A cell: its text, and the same text as printed (coloured) when it differs.
pub(super) type Cell = (String, Option<String>);

/// A table being filled.
pub(super) struct Table {
    columns: Vec<Column>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    /// An empty table with these columns.
    pub(super) fn new(columns: Vec<Column>) -> Table {
        Table {
            columns,
            rows: Vec::new(),
        }
    }

    /// Adds a row (one cell per column).
    pub(super) fn row(&mut self, cells: Vec<Cell>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(cells);
    }

    /// The table as lines, fitted into `width` characters when given.
    pub(super) fn render(&self, width: Option<usize>) -> String {
        let mut widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, column)| {
                self.rows
                    .iter()
                    .map(|row| chars(&row[i].0))
                    .chain(std::iter::once(chars(column.header)))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        if let Some(width) = width {
            let total = |widths: &[usize]| {
                widths.iter().sum::<usize>() + GAP.len() * widths.len().saturating_sub(1)
            };
            while total(&widths) > width {
                let widest = (0..widths.len())
                    .filter(|&i| {
                        self.columns[i].shrinkable
                            && widths[i] > chars(self.columns[i].header).min(MIN_WIDTH)
                    })
                    .max_by_key(|&i| widths[i]);
                match widest {
                    Some(i) => widths[i] -= 1,
                    None => break,
                }
            }
        }
        let mut out = String::new();
        let headers: Vec<Cell> = self
            .columns
            .iter()
            .map(|c| (c.header.to_owned(), None))
            .collect();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (plain, painted)) in row.iter().enumerate() {
                let last = i + 1 == row.len();
                let fitted = fit(plain, widths[i]);
                let shown = match painted {
                    Some(painted) if fitted == *plain => painted.clone(),
                    _ => fitted.clone(),
                };
                line.push_str(&shown);
                if !last {
                    line.push_str(&" ".repeat(widths[i] - chars(&fitted)));
                    line.push_str(GAP);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// The number of characters of a text.
fn chars(text: &str) -> usize {
    text.chars().count()
}

/// `text`, cut to `width` characters with `…` at the end when longer.
fn fit(text: &str, width: usize) -> String {
    if chars(text) <= width {
        text.to_owned()
    } else if width == 0 {
        String::new()
    } else {
        let mut cut: String = text.chars().take(width - 1).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::{Column, Table};

    fn table() -> Table {
        let mut table = Table::new(vec![
            Column::fixed("ID"),
            Column::shrinkable("TYPE"),
            Column::shrinkable("MESSAGE"),
        ]);
        table.row(vec![
            ("0123456789".into(), None),
            ("command".into(), None),
            ("a long message about the task".into(), None),
        ]);
        table.row(vec![
            ("abc".into(), None),
            ("code".into(), None),
            ("short".into(), None),
        ]);
        table
    }

    #[test]
    fn columns_are_aligned_and_nothing_is_cut_without_a_width() {
        assert_eq!(
            table().render(None),
            "ID          TYPE     MESSAGE\n\
             0123456789  command  a long message about the task\n\
             abc         code     short\n"
        );
    }

    #[test]
    fn the_widest_shrinkable_column_is_cut_to_fit() {
        let rendered = table().render(Some(30));
        assert_eq!(
            rendered,
            "ID          TYPE     MESSAGE\n\
             0123456789  command  a long m…\n\
             abc         code     short\n"
        );
        assert!(rendered.lines().all(|l| l.chars().count() <= 30));
        // Too narrow for anything: the shrinkable columns stop at three characters.
        let narrow = table().render(Some(5));
        assert_eq!(
            narrow,
            "ID          TY…  ME…\n0123456789  co…  a …\nabc         co…  sh…\n"
        );
    }

    #[test]
    fn a_painted_cell_is_printed_as_painted_unless_cut() {
        let mut table = Table::new(vec![Column::fixed("S"), Column::shrinkable("M")]);
        table.row(vec![
            ("ok".into(), Some("\x1b[32mok\x1b[0m".into())),
            ("x".into(), None),
        ]);
        assert_eq!(table.render(None), "S   M\n\x1b[32mok\x1b[0m  x\n");
    }
}

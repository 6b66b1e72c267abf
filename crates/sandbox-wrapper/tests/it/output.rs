//! The output sink's files: the combined output, and each stream alone beside it, each under
//! the cap, with a bounded tail of its own.

use sandbox_wrapper::output::{
    OutputSink, OutputStream, Stream, TAIL_BYTES, output_files, read_output, read_output_tail,
    stream_path,
};

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn each_stream_has_its_own_file_beside_the_combined_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("task.log");
    let sink = OutputSink::create(&path, 1 << 20).unwrap();
    sink.write(Stream::Stdout, b"one\n");
    sink.write(Stream::Stderr, b"err\n");
    sink.write(Stream::Stdout, b"two\n");
    sink.note("[msbd: a note]\n");
    sink.flush();

    let [combined, stdout, stderr] = output_files(&path);
    assert_eq!(combined, path);
    assert_eq!(stdout, dir.path().join("task.log.stdout"));
    assert_eq!(stderr, dir.path().join("task.log.stderr"));
    assert_eq!(stdout, stream_path(&path, Stream::Stdout));
    assert_eq!(
        read(&combined),
        "one\nerr\ntwo\n[msbd: a note]\n",
        "interleaved as written, with msbd's notes"
    );
    assert_eq!(
        read(&stdout),
        "one\ntwo\n",
        "no note: the process wrote none"
    );
    assert_eq!(read(&stderr), "err\n");
    assert_eq!(sink.tail(), "one\nerr\ntwo\n[msbd: a note]\n");
    assert_eq!(sink.stream_tail(Stream::Stdout), "one\ntwo\n");
    assert_eq!(sink.stream_tail(Stream::Stderr), "err\n");
    assert_eq!(sink.stream_sizes(Stream::Stdout), (8, 0));
    assert_eq!(sink.stream_sizes(Stream::Stderr), (4, 0));

    // Each is read by a cursor of its own.
    let which = |name| OutputStream::parse(name).unwrap();
    let chunk = read_output(&which("stderr").path(&path), 0, 100).unwrap();
    assert_eq!(
        (chunk.data.as_str(), chunk.next_cursor, chunk.size),
        ("err\n", 4, 4)
    );
    let chunk = read_output(&which("stdout").path(&path), 4, 100).unwrap();
    assert_eq!(chunk.data, "two\n");
    let (start, chunk) = read_output_tail(&which("stdout").path(&path), 4).unwrap();
    assert_eq!((start, chunk.data.as_str()), (4, "two\n"));
    assert_eq!(which("combined").path(&path), path);
    assert_eq!(OutputStream::parse("both"), None);
    assert_eq!(OutputStream::default(), OutputStream::Combined);

    // A new sink at the same path starts all three files afresh.
    drop(sink);
    let again = OutputSink::create(&path, 1 << 20).unwrap();
    again.write(Stream::Stderr, b"x");
    again.flush();
    assert_eq!(
        (read(&combined), read(&stdout), read(&stderr)),
        ("x".to_owned(), String::new(), "x".to_owned())
    );
}

#[test]
fn every_file_keeps_at_most_the_cap_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("capped.log");
    let sink = OutputSink::create(&path, 10).unwrap();
    sink.write(Stream::Stdout, b"aaaaaa"); // 6
    sink.write(Stream::Stderr, b"bbbbbb"); // 6: the combined file is full after 4 of them
    sink.write(Stream::Stdout, b"cccccc"); // stdout's own file is full after 4 of them
    sink.write(Stream::Stderr, &vec![b'd'; 2 * TAIL_BYTES]);
    sink.flush();
    let [combined, stdout, stderr] = output_files(&path);
    assert_eq!(read(&combined), "aaaaaabbbb");
    assert_eq!(read(&stdout), "aaaaaacccc");
    assert_eq!(read(&stderr), "bbbbbbdddd");
    let total = 18 + 2 * TAIL_BYTES as u64;
    assert_eq!(sink.sizes(), (10, total - 10));
    assert_eq!(sink.stream_sizes(Stream::Stdout), (10, 2));
    assert_eq!(
        sink.stream_sizes(Stream::Stderr),
        (10, 6 + 2 * TAIL_BYTES as u64 - 10)
    );
    // The tails go on past the cap, bounded.
    assert_eq!(sink.stream_tail(Stream::Stdout), "aaaaaacccccc");
    assert_eq!(sink.stream_tail(Stream::Stderr), "d".repeat(TAIL_BYTES));
    assert_eq!(sink.tail(), "d".repeat(TAIL_BYTES));
}

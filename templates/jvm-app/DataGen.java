import java.io.BufferedWriter;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;

/**
 * Writes the jvm-app data set: a JSON array of N catalogue items, deterministic (item i is a pure
 * function of i, so a client can check any answer without the file). About 190 bytes per item.
 *
 * Usage: java DataGen OUT.json N
 */
public final class DataGen {
    private static final String[] COLORS = {"red", "green", "blue", "amber", "violet", "teal", "black"};

    private DataGen() {}

    /** The score of item i (also computed by bench/test_heavy_bench.py to check answers). */
    public static long score(long i) {
        return (i * 2654435761L) % 1000003L;
    }

    public static void main(String[] args) throws IOException {
        Path out = Path.of(args[0]);
        int n = Integer.parseInt(args[1]);
        Path tmp = out.resolveSibling(out.getFileName() + ".tmp");
        try (BufferedWriter w = Files.newBufferedWriter(tmp, StandardCharsets.UTF_8)) {
            w.write("[\n");
            for (int i = 0; i < n; i++) {
                long s = score(i);
                w.write(String.format(
                        "{\"key\":\"k%07d\",\"name\":\"item %d\",\"category\":\"c%d\",\"score\":%d,"
                                + "\"tags\":[\"t%d\",\"t%d\",\"t%d\"],"
                                + "\"attrs\":{\"color\":\"%s\",\"size\":%d,\"weight\":%.3f},"
                                + "\"history\":[%d,%d,%d,%d,%d,%d]}%s\n",
                        i, i, i % 211, s, i % 97, i % 89, i % 83,
                        COLORS[i % COLORS.length], s % 50, (s % 10007) / 7.0,
                        s % 1000, (s / 3) % 1000, (s / 7) % 1000, (s / 11) % 1000, (s / 13) % 1000,
                        (s / 17) % 1000, i + 1 < n ? "," : ""));
            }
            w.write("]\n");
        }
        Files.move(tmp, out, java.nio.file.StandardCopyOption.REPLACE_EXISTING,
                java.nio.file.StandardCopyOption.ATOMIC_MOVE);
    }
}

/* Pipe ping-pong between two processes (run pinned to one CPU: every round
 * trip is two context switches). Prints the fastest of REPS batches of N
 * round trips, in ns per round trip. Used by measure.sh. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 20000, reps = argc > 2 ? atoi(argv[2]) : 5;
    int ab[2], ba[2];
    char c = 0;
    if (pipe(ab) || pipe(ba)) return 1;
    pid_t child = fork();
    if (child == 0) {
        close(ab[1]);
        for (;;) {
            if (read(ab[0], &c, 1) != 1) _exit(0);
            if (write(ba[1], &c, 1) != 1) _exit(0);
        }
    }
    double best = 1e18;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        for (int i = 0; i < n; i++) {
            if (write(ab[1], &c, 1) != 1 || read(ba[0], &c, 1) != 1) return 1;
        }
        double per = (now() - t0) / n;
        if (per < best) best = per;
    }
    close(ab[1]);
    waitpid(child, NULL, 0);
    printf("%.0f\n", best);
    return 0;
}

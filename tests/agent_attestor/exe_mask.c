/* A process that makes its /proc/<pid>/exe name another file, as any user may from a user
 * namespace of its own (PR_SET_MM_MAP asks for CAP_CHECKPOINT_RESTORE there, not in the
 * initial namespace). x86_64 only; built static, so that nothing it runs is mapped from a file
 * once its own image is unmapped (which the kernel asks first). Two modes:
 *
 * exe_mask TARGET: the process moves into a user namespace of its own and points its exe at
 * TARGET. Prints "y" once the link names TARGET ("n" if the kernel refused), then waits to be
 * killed.
 *
 * exe_mask TARGET SOCKET: the process that connects stays in the caller's user namespace: it
 * clones a child that shares its memory (CLONE_VM) into a user namespace of its own, and the
 * child, capable there, points the *shared* mm's exe at TARGET. /proc/<pid>/exe of the parent,
 * whose ns/user is the caller's, then names TARGET. Once it does, connects to SOCKET
 * (close-on-exec) and prints "y" and the connection's descriptor number as one byte ("n" if
 * the kernel refused the mask, "c" if the connect failed), then waits to be killed. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/prctl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

struct range {
    unsigned long start, end;
};

struct plan {
    int shared; /* the mode with SOCKET */
    struct sockaddr_un addr;
    long nranges;
    struct range ranges[32];
    struct prctl_mm_map map;
};

static inline __attribute__((always_inline)) long sys3(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}

/* Unmaps the image and points the mm's exe at the plan's target; 0 if the kernel agreed. Inlined
 * into stub, so it too calls nothing from the image it unmaps. */
static inline __attribute__((always_inline)) long mask(struct plan *p) {
    for (long i = 0; i < p->nranges; i++)
        sys3(SYS_munmap, (long)p->ranges[i].start, (long)(p->ranges[i].end - p->ranges[i].start), 0);
    long ret;
    register long r10 __asm__("r10") = sizeof(struct prctl_mm_map);
    register long r8 __asm__("r8") = 0;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(SYS_prctl), "D"(PR_SET_MM), "S"(PR_SET_MM_MAP), "d"(&p->map), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return ret;
}

/* Copied to anonymous memory and run from there: it calls nothing but inlined syscalls. In the
 * shared mode the child is vfork'd (CLONE_VFORK: the parent waits), so sharing this stack is
 * safe. */
__attribute__((noinline)) static void stub(struct plan *p) {
    if (!p->shared) {
        char answer = mask(p) == 0 ? 'y' : 'n';
        sys3(SYS_write, 1, (long)&answer, 1);
        for (;;)
            sys3(SYS_pause, 0, 0, 0);
    }
    long pid = sys3(SYS_clone, CLONE_VM | CLONE_VFORK | CLONE_NEWUSER | 17 /* SIGCHLD */, 0, 0);
    if (pid == 0)
        sys3(SYS_exit, mask(p) == 0 ? 0 : 1, 0, 0);
    int status = 0;
    long waited;
    register long r10w __asm__("r10") = 0;
    __asm__ volatile("syscall" : "=a"(waited) : "a"(SYS_wait4), "D"(pid), "S"(&status), "d"(0), "r"(r10w) : "rcx", "r11", "memory");
    char answer[2] = {(pid > 0 && waited == pid && status == 0) ? 'y' : 'n', 0};
    /* Connected only now, masked: the agent identifies a connection as it is accepted. */
    long conn = sys3(SYS_socket, AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (conn < 0 || sys3(SYS_connect, conn, (long)&p->addr, sizeof p->addr) != 0)
        answer[0] = 'c';
    answer[1] = (char)conn;
    sys3(SYS_write, 1, (long)answer, 2);
    for (;;)
        sys3(SYS_pause, 0, 0, 0);
}

static void stub_end(void) {}

int main(int argc, char **argv) {
    struct plan plan; /* on the stack: the image's data is unmapped with its code */
    memset(&plan, 0, sizeof plan);
    if (argc != 2 && argc != 3)
        return 2;
    plan.shared = argc == 3;
    int target = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (plan.shared) {
        plan.addr.sun_family = AF_UNIX;
        strncpy(plan.addr.sun_path, argv[2], sizeof plan.addr.sun_path - 1);
    }
    if (target < 0 || (!plan.shared && unshare(CLONE_NEWUSER) != 0)) {
        perror("exe_mask");
        return 1;
    }
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n < 0)
        return 1;
    self[n] = 0;
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[8192];
    while (maps && fgets(line, sizeof line, maps)) {
        unsigned long s, e;
        char path[4096] = "";
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %4095s", &s, &e, path) >= 2 &&
            strcmp(path, self) == 0 && plan.nranges < 32)
            plan.ranges[plan.nranges++] = (struct range){s, e};
    }
    if (maps)
        fclose(maps);
    FILE *stat = fopen("/proc/self/stat", "r");
    char buf[8192];
    size_t len = stat ? fread(buf, 1, sizeof buf - 1, stat) : 0;
    if (stat)
        fclose(stat);
    buf[len] = 0;
    char *q = strrchr(buf, ')');
    if (q == NULL)
        return 1;
    q += 4; /* past ") S ": field 4 is next */
    unsigned long f[53] = {0};
    for (int i = 4; i <= 52; i++)
        f[i] = strtoul(q, &q, 10);
    struct prctl_mm_map *m = &plan.map;
    m->start_code = f[26];
    m->end_code = f[27];
    m->start_stack = f[28];
    m->start_data = f[45];
    m->end_data = f[46];
    m->start_brk = f[47];
    m->brk = (unsigned long)sbrk(0);
    m->arg_start = f[48];
    m->arg_end = f[49];
    m->env_start = f[50];
    m->env_end = f[51];
    m->exe_fd = (unsigned)target;
    size_t size = (size_t)((char *)stub_end - (char *)stub);
    if (size == 0 || size > 4096)
        size = 4096;
    void *code = mmap(NULL, 8192, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED)
        return 1;
    memcpy(code, (void *)stub, size);
    fflush(stdout);
    ((void (*)(struct plan *))code)(&plan);
    return 0;
}

# TEST-ONLY image of the web service for tests/e2e (built by tests/e2e/images.sh with the legacy
# builder). Same contents, user, port, entrypoint and environment as the final stage of the
# repository's Dockerfile and as the Nix image; only the source of the binary differs: the static
# /bin/web is built on the host (glibc, +crt-static) and staged, with the CA bundle, /etc/passwd,
# /etc/group (user/group web, 65532) and an empty /tmp (1777), in the build context's rootfs/.
FROM scratch
COPY rootfs/ /
USER 65532:65532
EXPOSE 5000/tcp
ENV PORT=5000
ENTRYPOINT ["/bin/web"]

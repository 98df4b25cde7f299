-- 0007_machine_tags_json (shipped: append-only, never edited)
-- Each machine's tags (both sources, sorted, once each) as a JSON array on its row, kept
-- by triggers so no code path can forget it: GET /api/v1/status at 100,000 machines
-- spent a quarter of its time in a per-machine tag sub-select. Tags change rarely
-- (an agent's usual report writes no tag row), so the triggers seldom fire.
ALTER TABLE machines ADD COLUMN tags_json TEXT NOT NULL DEFAULT '[]';
UPDATE machines SET tags_json = (SELECT json_group_array(tag)
        FROM (SELECT tag FROM machine_tags
        WHERE machine_id = machines.id GROUP BY tag));
CREATE TRIGGER machine_tags_added AFTER INSERT ON machine_tags BEGIN
    UPDATE machines SET tags_json = (SELECT json_group_array(tag)
        FROM (SELECT tag FROM machine_tags
        WHERE machine_id = NEW.machine_id GROUP BY tag))
    WHERE id = NEW.machine_id;
END;
CREATE TRIGGER machine_tags_removed AFTER DELETE ON machine_tags BEGIN
    UPDATE machines SET tags_json = (SELECT json_group_array(tag)
        FROM (SELECT tag FROM machine_tags
        WHERE machine_id = OLD.machine_id GROUP BY tag))
    WHERE id = OLD.machine_id;
END;
CREATE TRIGGER machine_tags_changed AFTER UPDATE ON machine_tags BEGIN
    UPDATE machines SET tags_json = (SELECT json_group_array(tag)
        FROM (SELECT tag FROM machine_tags
        WHERE machine_id = OLD.machine_id GROUP BY tag))
    WHERE id = OLD.machine_id;
    UPDATE machines SET tags_json = (SELECT json_group_array(tag)
        FROM (SELECT tag FROM machine_tags
        WHERE machine_id = NEW.machine_id GROUP BY tag))
    WHERE id = NEW.machine_id;
END;
